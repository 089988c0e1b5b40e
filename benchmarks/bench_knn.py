"""Time `knn_scores` against the published arithmetic and the cdist + topk floor.

    .venv/bin/python benchmarks/bench_knn.py            # 4096 x 1024 float32, k=16, ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_knn.py --quick    # skip the (slow) published baselines

Writes experiments/bench/knn_<device>.md (markdown table + provenance) and knn_<device>.csv.
Timings are best of --repeats interleaved rounds for ours and the floor, one run per published baseline.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the published-arithmetic oracle lives with the tests

import published_detectors as pub  # noqa: E402

from clipbd.detectors import knn_scores  # noqa: E402

FOUR = ("kdist", "lid", "slof", "dao")


def make_data(kind: str, n: int, d: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "random":
        x = torch.randn(n, d, generator=g)
    else:  # 64 Gaussian clusters: neighbours are mostly within a cluster, like class-structured CLIP features
        centres = 3.0 * torch.randn(64, d, generator=g)
        x = centres[torch.randint(0, 64, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return x.to(device)


def round_robin(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each fn over `repeats` interleaved rounds (after one warm-up round), so that a
    burst of load from other processes on a shared machine hits every entry alike."""
    best = {name: float("inf") for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            if r:  # round 0 warms up the thread pool and allocator
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_one(kind: str, args) -> list[dict]:
    x = make_data(kind, args.n, args.d, args.device)
    k = args.k
    fns = {"floor": lambda: torch.topk(torch.cdist(x, x), k + 1, dim=1, largest=False)}
    for conv in ("textbook", "faithful"):
        fns[f"all/{conv}"] = lambda conv=conv: knn_scores(x, k=k, methods=FOUR, convention=conv)
        for m in FOUR:
            fns[f"{m}/{conv}"] = lambda m=m, conv=conv: knn_scores(x, k=k, methods=(m,), convention=conv)
    t = round_robin(fns, args.repeats)
    rows = [dict(data=kind, what="floor: torch.cdist + torch.topk(k+1)", seconds=t["floor"])]
    for conv in ("textbook", "faithful"):
        rows.append(dict(data=kind, what=f"ours, all four ({conv})", seconds=t[f"all/{conv}"]))
        rows += [dict(data=kind, what=f"ours, {m} alone ({conv})", seconds=t[f"{m}/{conv}"]) for m in FOUR]
    if not args.quick:
        faithful = knn_scores(x, k=k, methods=FOUR, convention="faithful")
        for mode, label in ((pub.EXACT, "exact cdist"), (pub.PUBLISHED_DEFAULT, "default float32-mm cdist")):
            for m in FOUR:
                _sync()
                t0 = time.perf_counter()
                want = pub.DETECTORS[m](x, k, compute_mode=mode).cpu().numpy()
                _sync()
                sec = time.perf_counter() - t0
                err = np.max(np.abs(faithful[m] - want)) / np.max(np.abs(want))
                rows.append(dict(data=kind, what=f"published {m}, {label} (once)", seconds=sec,
                                 speedup=sec / t[f"{m}/faithful"], faithful_diff=err))
    if not args.quick and kind == "random":  # is the gap the published float32 run's own rounding?
        t0 = time.perf_counter()
        want = pub.dao(x.double(), k).cpu().numpy()
        sec = time.perf_counter() - t0
        err = np.max(np.abs(faithful["dao"] - want)) / np.max(np.abs(want))
        rows.append(dict(data=kind, what="published dao, exact cdist, float64 features (once)",
                         seconds=sec, speedup=sec / t["dao/faithful"], faithful_diff=err))
    for r in rows:
        r["x_floor"] = r["seconds"] / t["floor"]
    return rows


def to_markdown(rows: list[dict], args, load: str) -> str:
    head = ("| data | what | seconds | × floor | published ÷ ours (same method, faithful) | "
            "max abs diff / max abs score, faithful vs published |\n|---|---|---:|---:|---:|---:|\n")
    body = ""
    for r in rows:
        speed = f"{r['speedup']:.0f}" if "speedup" in r else ""
        diff = f"{r['faithful_diff']:.1e}" if "faithful_diff" in r else ""
        body += f"| {r['data']} | {r['what']} | {r['seconds']:.3f} | {r['x_floor']:.2f} | {speed} | {diff} |\n"
    return (
        f"# knn_scores timings ({args.device})\n\n"
        f"{args.n} x {args.d} float32 features scored against themselves, k={args.k}.\n"
        f"Date {dt.date.today().isoformat()}; torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads; {_cpu_name()}; load average at start {load}.\n"
        f"Regenerate: `.venv/bin/python benchmarks/bench_knn.py"
        f"{' --device ' + args.device if args.device != 'cpu' else ''}`\n\n"
        f"Ours and the floor: best of {args.repeats} interleaved rounds after a warm-up round. Published: "
        "`tests/published_detectors.py` (the published arithmetic, per-row gather loop included), run "
        "once each, with exact distances (`compute_mode=\"donot_use_mm_for_euclid_dist\"`, the mode "
        "`convention=\"faithful\"` reproduces) and with the published default (float32 matrix "
        "products). The last column is the largest |ours faithful - published| over the largest "
        "|published| score: the published float32 run's own rounding for the exact mode (near-ties "
        "among neighbours swap; the float64 row shows the arithmetic itself agrees), and float32 "
        "cancellation (a non-zero self-distance inside the neighbours' LID) for the default mode.\n\n" + head + body
    )


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="skip the published baselines")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "bench")
    args = p.parse_args()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = [r for kind in ("random", "clustered") for r in bench_one(kind, args)]
    md = to_markdown(rows, args, load)
    print(md)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = args.device.split(":")[0]
        (args.out / f"knn_{tag}.md").write_text(md)
        fields = ["data", "what", "seconds", "x_floor", "speedup", "faithful_diff"]
        with open(args.out / f"knn_{tag}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
