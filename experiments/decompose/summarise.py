"""Markdown tables of a decompose stage's report: `python experiments/decompose/summarise.py RUN_DIR...`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def tag(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def summarise(run_dir: Path) -> str:
    report = json.loads((run_dir / "decompose" / "report.json").read_text())
    out = []
    for name, r in report["triggers"].items():
        b, h = r["baseline"], r["heads"]
        out += [f"### {run_dir.name}: {name} -> {r['target']} ({report['convention']}, "
                f"{r['images']['validation']} validation / {r['images']['test']} test images)", "",
                "| ablation (ASR / clean acc) | " + " | ".join(
                    f"{m} {tag(s['layers'])}" for m in ("single", "accumulated") for s in r["ablations"]["attn"][m]) + " |",
                "|---|" + "---|" * (2 * r["shape"]["layers"])]
        for kind, c in r["ablations"].items():
            out.append(f"| {kind} | " + " | ".join(f"{s['asr']:.3f} / {s['clean_acc']:.3f}"
                                                  for m in ("single", "accumulated") for s in c[m]) + " |")
        rep, det, mlp = h["rep"], h["det"], r["mlp_repair"]
        out += ["", "| | ASR | clean acc | BD-ACC |", "|---|---|---|---|",
                f"| baseline | {b['asr']:.3f} | {b['clean_acc']:.3f} | {b['bd_acc']:.3f} |"]
        out += [f"| Decomp-Rep ({k}, layers {tag(h['layers'])}) | {rep[k]['asr']:.3f} | {rep[k]['clean_acc']:.3f} | "
                f"{rep[k]['bd_acc']:.3f} |" for k in ("published", "normalised")]
        out += [f"| MLP repair (layers {tag(mlp['layers'])}) | {mlp['asr']:.3f} | {mlp['clean_acc']:.3f} | "
                f"{mlp['bd_acc']:.3f} |", "", "| Decomp-Det | AUROC | AUPRC | FPR95 |", "|---|---|---|---|"]
        out += [f"| {k} | {det[k]['auroc']:.3f} | {det[k]['auprc']:.3f} | {det[k]['fpr95']:.3f} |"
                for k in ("count", "count_normalised", "continuous")]
        f = det["filter"]
        out += ["", f"Filter \"more than ζ={f['zeta']} of {f['heads']} heads infected\": TPR {f['tpr']:.3f}, "
                f"FPR {f['fpr']:.3f}.", ""]
        for key in ("triggered_published", "clean_published", "triggered_normalised", "clean_normalised"):
            rows = h["share"][key]
            out.append(f"- share infected, {key.replace('_', ' ')} (layer rows): " + "; ".join(
                " ".join(f"{v:.2f}" for v in row) for row in rows))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print("\n".join(summarise(Path(p)) for p in sys.argv[1:]))
