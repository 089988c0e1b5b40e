"""Time `scoring.reference=global` (clipbd.detectors.reference): the faiss k-NN graph of every sample
and the four neighbourhood scores from it, with the neighbour recall of IVF against exact search.

    .venv/bin/python benchmarks/bench_global.py                     # 1M x 512, IVF (the issue's target)
    .venv/bin/python benchmarks/bench_global.py --n 100000 --quick  # a smaller size, nothing written

Data: float32 embeddings-like points, `--clusters` Gaussian clusters, each spread along its own random
`--intrinsic`-dimensional subspace plus small isotropic noise (class-structured, low intrinsic
dimension, as CLIP features; i.i.d. Gaussian noise in 512-d would have no neighbourhood structure for
any index to exploit). Recall: for `--recall-rows` random rows, the fraction of their exact k nearest
other rows (clipbd.detectors.exact_knn, float64-certified) found by the graph. Writes
experiments/bench/global_cpu.md and .csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipbd.detectors.reference import (  # noqa: E402
    FeatureSpace,
    candidate_graph,
    default_nlist,
    global_scores,
    neighbour_recall,
)

FOUR = ("kdist", "lid", "slof", "dao")


def make_data(n: int, d: int, clusters: int, intrinsic: int, seed: int = 0) -> np.ndarray:
    """[n, d] float32: cluster centre + own low-rank spread + isotropic noise, built in blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    bases = rng.standard_normal((clusters, intrinsic, d)).astype(np.float32) * (0.5 / np.sqrt(intrinsic))
    label = rng.integers(0, clusters, n)
    x = 0.02 * rng.standard_normal((n, d), dtype=np.float32)
    for c in range(clusters):
        rows = np.nonzero(label == c)[0]
        x[rows] += centres[c] + rng.standard_normal((len(rows), intrinsic), dtype=np.float32) @ bases[c]
    return x


def run(args, n: int) -> dict:
    t0 = time.perf_counter()
    x = make_data(n, args.d, args.clusters, args.intrinsic)
    t_data = time.perf_counter() - t0
    nlist = args.nlist or default_nlist(n)
    t0, c0 = time.perf_counter(), time.process_time()
    graph = candidate_graph(x, args.k + 1, args.index, nlist=nlist, nprobe=args.nprobe, seed=0)
    t_graph, c_graph = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    scores = global_scores(FeatureSpace(x, x, (0,)), k=args.k, methods=FOUR, graph=graph)
    t_scores, c_scores = time.perf_counter() - t0, time.process_time() - c0
    assert all(np.isfinite(s).all() for s in scores.values())
    rows = np.sort(np.random.default_rng(1).choice(n, min(args.recall_rows, n), replace=False))
    t0 = time.perf_counter()
    recall = neighbour_recall(graph[1], x, rows, args.k)
    t_recall = time.perf_counter() - t0
    return dict(n=n, d=args.d, k=args.k, index=args.index, nlist=nlist if args.index == "ivf" else "",
                nprobe=args.nprobe if args.index == "ivf" else "", graph_s=t_graph, scores_s=t_scores,
                total_s=t_graph + t_scores, cpu_s=c_graph + c_scores, recall=recall, recall_rows=len(rows), recall_s=t_recall,
                data_s=t_data, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def to_markdown(rows: list[dict], args, load: str) -> str:
    cmd = " ".join(sys.argv[1:])
    return (
        "# global reference set timings (cpu)\n\n"
        f"`scoring.reference=global` on N x {args.d} float32 points ({args.clusters} clusters, "
        f"intrinsic dimension {args.intrinsic}; see benchmarks/bench_global.py), k={args.k}: every point is "
        "a query and a reference point (its own row excluded).\n"
        f"Date {dt.date.today().isoformat()}; torch {torch.__version__}; faiss {_faiss_version()}; "
        f"{torch.get_num_threads()} threads; {_cpu_name()}; load average at start {load}, "
        f"niceness {os.nice(0)}.\n"
        f"Regenerate: `.venv/bin/python benchmarks/bench_global.py {cmd}`\n\n"
        "| N | d | k | index | nlist | nprobe | graph (faiss build + search + float64 re-rank) s | "
        "scores (4 methods) s | total wall s | total CPU s (all threads) | recall@k vs exact | rows sampled | "
        "peak RSS GiB |\n|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        + "".join(f"| {r['n']:,} | {r['d']} | {r['k']} | {r['index']} | {r['nlist']} | {r['nprobe']} | "
        f"{r['graph_s']:.1f} | {r['scores_s']:.1f} | {r['total_s']:.1f} | {r['cpu_s']:.1f} | {r['recall']:.4f} | "
        f"{r['recall_rows']} | {r['peak_rss_gib']:.1f} |\n" for r in rows)
        + "\nWall times depend on what else runs on the machine; CPU seconds (process time, both threads) "
        "do not, and half of them is the wall time of an otherwise idle 2-core machine. Peak RSS is the "
        "process maximum so far (cumulative over rows).\n"
    )


def _faiss_version() -> str:
    import faiss

    return faiss.__version__


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
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="one row per size")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--index", default="ivf", choices=("flat", "ivf"))
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--intrinsic", type=int, default=16)
    p.add_argument("--recall-rows", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="print only, write nothing")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "bench")
    args = p.parse_args()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for n in args.n:
        rows.append(run(args, n))
        print(rows[-1], flush=True)
    md = to_markdown(rows, args, load)
    print(md)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "global_cpu.md").write_text(md)
        with open(args.out / "global_cpu.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
