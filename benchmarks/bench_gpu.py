"""GPU readiness figures (issue 17): one script to run on a CUDA box, writing experiments/bench/gpu.md.

    .venv/bin/python benchmarks/bench_gpu.py                  # everything (about 10 min on one H200)
    .venv/bin/python benchmarks/bench_gpu.py --dao-n 3000000  # the in-batch DAO size of CC3M
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick   # the script itself, tiny sizes

1. The pipeline on CUDA with AMP: `benchmarks/bench_pipeline.py --device cuda` for the default
   (tiny ViT; 20,000 samples since session 17) and ViT-B/32 at 224 px — one pretraining epoch and the extract stage
   against the bare model on the same samples (`model.precision=amp`).
2. Extraction throughput of the bare image towers, RN50 and ViT-B/32 at 224 px (random weights,
   AMP, batch 256): images/s of `encode_image`.
3. In-batch DAO over N x 1024 float32 embeddings in scoring batches of 1024 (k = 16, the paper's
   CC3M regime): `clipbd.detectors.knn_scores` on the GPU against the cdist + topk floor on the same
   GPU (the least any exact in-batch k-NN detector must do).
Each figure records the GPU, torch and CUDA versions. Nothing downloads: models are open_clip
architectures with random weights.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipbd.detectors import knn_scores  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tower_throughput(name: str, device: str, batch: int, steps: int) -> float:
    """images/s of encode_image at 224 px, AMP on CUDA (best of `steps` timed batches after warm-up)."""
    import open_clip

    model = open_clip.create_model(name, pretrained=None).to(device).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)
    best = float("inf")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=device.startswith("cuda")):
        for i in range(steps + 2):
            sync(device)
            t0 = time.perf_counter()
            model.encode_image(x)
            sync(device)
            if i >= 2:
                best = min(best, time.perf_counter() - t0)
    return batch / best


def dao_in_batch(n: int, d: int, batch: int, k: int, device: str) -> tuple[float, float]:
    """Seconds for in-batch DAO over n x d embeddings in batches of `batch`, and for the floor."""
    g = torch.Generator(device="cpu").manual_seed(0)
    centres = 3.0 * torch.randn(64, d, generator=g)
    ours = floor = 0.0
    for lo in range(0, n - batch + 1, batch):  # data made per batch: n x d need not fit at once
        x = (centres[torch.randint(0, 64, (batch,), generator=g)] + torch.randn(batch, d, generator=g)).to(device)
        sync(device)
        t0 = time.perf_counter()
        knn_scores(x, k=k, methods=("dao",))
        sync(device)
        t1 = time.perf_counter()
        torch.topk(torch.cdist(x, x), k + 1, largest=False)
        sync(device)
        ours, floor = ours + t1 - t0, floor + time.perf_counter() - t1
    return ours, floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the GPU")
    ap.add_argument("--dao-n", type=int, default=3_000_000)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "bench")
    args = ap.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU box, "
                 "or --device cpu --quick to check the script")
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"
    lines = [f"# GPU readiness ({gpu})", "",
             f"{dt.date.today()} · torch {torch.__version__} · CUDA {torch.version.cuda} · "
             f"`benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}`", ""]
    # 1. the pipeline on CUDA with AMP
    sizes = ["smoke"] if args.quick else ["default", "vitb32"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_pipeline.py"), "--device", dev,
                           "--sizes", *sizes, "--repeats", "1" if args.quick else "2", "--out", str(args.out)],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench_gpu: bench_pipeline failed:\n{proc.stderr[-3000:]}")
    lines += ["## 1. Pipeline vs bare model", "",
              f"`experiments/bench/pipeline_{dev.split(':')[0]}.md` (bench_pipeline.py; AMP as configured per model).", ""]
    # 2. bare image towers at 224 px
    batch, steps = (8, 2) if args.quick else (256, 10)
    lines += ["## 2. Image-tower throughput at 224 px (random weights, AMP, batch %d)" % batch, "",
              "| model | images/s |", "|---|---|"]
    for name in ("RN50", "ViT-B-32"):
        lines.append(f"| {name} | {tower_throughput(name, dev, batch, steps):.0f} |")
    # 3. in-batch DAO
    n = 4096 if args.quick else args.dao_n
    ours, floor = dao_in_batch(n, 1024, 1024, 16, dev)
    lines += ["", f"## 3. In-batch DAO, {n:,} x 1024 float32, batches of 1024, k = 16", "",
              "| what | s | samples/s |", "|---|---|---|",
              f"| clipbd knn_scores (dao) | {ours:.1f} | {n / ours:,.0f} |",
              f"| floor: cdist + topk | {floor:.1f} | {n / floor:,.0f} |",
              f"| ratio | {ours / floor:.2f} | |", ""]
    name = "gpu_quick.md" if args.quick else "gpu.md"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
