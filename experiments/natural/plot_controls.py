"""Mask size of the motif's inverted trigger beside the eight class-caption controls, per world.

    python experiments/natural/plot_controls.py OUT.png LABEL=DIR [LABEL=DIR ...]   (\\n in a LABEL breaks the line)

DIR: an output directory of controls.py (its rows.json). One column of points per world: each
control caption's mask L1 (pixels of the 32x32 image) in grey, the motif's in red, with its held-out
ASR; below, the motif's inverted mask and pattern of the last world, if its PNGs are there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("worlds", nargs="+", help="LABEL=DIR")
    args = ap.parse_args()
    worlds = []
    for spec in args.worlds:
        label, _, d = spec.partition("=")
        label = label.replace("\\n", "\n")  # a literal \n from the shell breaks the tick label
        if not d:
            raise SystemExit(f"plot_controls: {spec!r}: give LABEL=DIR")
        worlds.append((label, json.loads((Path(d) / "rows.json").read_text()), Path(d)))
    last = worlds[-1][2]
    pngs = [last / f"motif_{k}.png" for k in ("mask", "pattern", "stamped")]
    show = all(p.exists() for p in pngs)
    fig = plt.figure(figsize=(2.2 * len(worlds) + 1.5, 6.2 if show else 4.2))
    ax = fig.add_axes([0.12, 0.42 if show else 0.14, 0.84, 0.5 if show else 0.76])
    for x, (label, rows, _) in enumerate(worlds):
        ctrl = [r for r in rows if r["role"] != "motif"]
        motif = [r for r in rows if r["role"] == "motif"]
        ax.scatter([x] * len(ctrl), [r["mask_l1"] for r in ctrl], color="0.55", s=28,
                   label="class-caption controls" if x == 0 else None, zorder=2)
        for r in motif:
            ax.scatter([x], [r["mask_l1"]], color="tab:red", s=60, marker="D", zorder=3,
                       label="motif caption" if x == 0 else None)
            ax.annotate(f"ASR {r['asr']:.2f}", (x, r["mask_l1"]), xytext=(8, -4), textcoords="offset points",
                        fontsize=8, color="tab:red")
    ax.set_xticks(range(len(worlds)), [w[0] for w in worlds], fontsize=8)
    ax.set_xlim(-0.5, len(worlds) - 0.3)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("inverted mask L1 (px of 1,024)")
    ax.set_title("Trigger inversion: the motif's caption vs one caption per class", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if show:
        for i, (p, t) in enumerate(zip(pngs, ("mask", "pattern", "stamped held-out images"))):
            im = Image.open(p)
            w = 0.16 if i < 2 else 0.56
            sub = fig.add_axes([0.06 + 0.18 * i if i < 2 else 0.42, 0.04, w, 0.28])
            sub.imshow(im)
            sub.set_axis_off()
            sub.set_title(f"{worlds[-1][0]}: motif {t}", fontsize=7)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
