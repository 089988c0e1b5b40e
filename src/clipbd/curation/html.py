"""report/index.html: one self-contained page (thumbnails and plots embedded as data URIs, no
script or style from elsewhere), readable from disk in any browser.

The page counts its own loaded thumbnails on `load` (`<body data-thumbs-loaded=...>`), so a headless
browser (tests/test_report.py) can check that every one decoded.
"""

from __future__ import annotations

from html import escape
from typing import Sequence

import numpy as np

from clipbd.curation.report import Cluster, TopRows

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#eee}td.t{text-align:left}
.cluster{border:1px solid #bbb;border-radius:6px;margin:.8em 0;padding:.5em;background:#fff}
.cluster h3{font-size:.95em;margin:.1em 0 .4em}
.grid{display:flex;flex-wrap:wrap;gap:6px}
.card{width:150px;font-size:.7em;border:1px solid #ddd;padding:3px;background:#fff;overflow-wrap:anywhere}
.card img{width:96px;height:96px;image-rendering:pixelated;display:block;margin:0 auto 2px}
.card.poison{border:2px solid #d22;background:#fff3f3}
.badge{background:#d22;color:#fff;border-radius:3px;padding:0 3px;font-weight:bold}
.sc{color:#555}.hist{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
.inv img{height:128px;width:auto;image-rendering:pixelated;margin-right:6px}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.thumb'), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-thumbs-loaded', String(ok));
  document.body.setAttribute('data-thumbs-total', String(imgs.length));
});
"""


def hist_svg(name: str, hist: dict, cutoff: float | None, width: int = 360, height: int = 120) -> str:
    """Inline SVG of a score histogram (log-scaled counts: the suspicious tail is a handful among
    millions); poisons' counts in red; the top-N cutoff as a dashed line."""
    counts, edges, poison = hist["counts"], hist["edges"], hist["poison"]
    scale = lambda c: np.log1p(c) / max(np.log1p(counts.max()), 1e-9)  # noqa: E731
    bw = width / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = height * scale(c)
        bars.append(f'<rect x="{i * bw:.1f}" y="{height - h:.1f}" width="{bw * 0.9:.1f}" height="{h:.1f}" fill="#68a"/>')
        if poison is not None and poison[i]:
            hp = height * scale(poison[i])
            bars.append(f'<rect x="{i * bw:.1f}" y="{height - hp:.1f}" width="{bw * 0.45:.1f}" height="{hp:.1f}" '
                        'fill="#d22"/>')
    line = ""
    if cutoff is not None and edges[-1] > edges[0]:
        x = width * (cutoff - edges[0]) / (edges[-1] - edges[0])
        line = f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#000" stroke-dasharray="4 3"/>'
    return (f'<div class="hist"><b>{escape(name)}</b> (log count; {edges[0]:.3g} … {edges[-1]:.3g}'
            f'{"; red: known poisons" if poison is not None else ""}; dashed: top-N cut)<br>'
            f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(bars)}{line}</svg></div>')


def _card(top: TopRows, r: int, uri: str, sort_by: str) -> str:
    poison = top.is_poison is not None and bool(top.is_poison[r])
    scores = " ".join(f'{escape(d)}={v[r]:.4g}' + ("*" if d == sort_by else "") for d, v in top.scores.items())
    return (f'<div class="card{" poison" if poison else ""}" data-rank="{r + 1}">'
            f'<img class="thumb" src="{uri}" alt="{escape(top.key[r])}">'
            f'#{r + 1} <b>{escape(top.key[r])}</b>{" <span class=badge>POISON</span>" if poison else ""}<br>'
            f'{escape(top.caption[r])}<br><span class="sc">{scores}</span></div>')


def _table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=t" if isinstance(v, str) else ""}>{escape(str(v))}</td>'
                                    for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(*, title: str, top: TopRows, clusters: Sequence[Cluster], thumbs: dict[int, str], sort_by: str,
           corpus_size: int, threshold: float, hists: dict[str, dict], metrics: dict,
           inversion: Sequence[dict] = ()) -> str:
    """The whole page. `thumbs`: global index -> data URI; `metrics`: metrics.json's detect/,
    attack/, eval/ and inspect/invert/ keys to show; `inversion`: rows {caption, asr, mask_px, pngs}."""
    n = len(top.index)
    n_poison = int(top.is_poison.sum()) if top.is_poison is not None else None
    cutoff = float(top.scores[sort_by][-1]) if n else None
    parts = [f"<h1>{escape(title)}</h1>",
             f'<p id="summary" data-count="{n}">Top <b>{n}</b> of {corpus_size} training samples by '
             f"<b>{escape(sort_by)}</b> (higher = more suspicious), in <b>{len(clusters)}</b> clusters "
             f"(near-duplicate images: cosine &gt; {threshold:g}, or the same caption after normalisation; a "
             f"cluster's share of the corpus counts the samples joined to it by the same rule, images compared "
             f"with its centroid)"
             + (f"; <b>{n_poison}</b> of them are known poisons (red)" if n_poison is not None else "") + ".</p>"]
    shown = {k: v for k, v in metrics.items() if k.split("/")[0] in ("detect", "attack", "eval", "inspect")
             and isinstance(v, (int, float))}
    if shown:
        parts += ["<h2>Metrics (metrics.json)</h2>", _table([(k, f"{v:.4g}") for k, v in shown.items()],
                                                             ["metric", "value"])]
    parts += ["<h2>Score distributions (whole corpus)</h2>"] + [
        hist_svg(d, h, cutoff if d == sort_by else None) for d, h in hists.items()]
    rows = [(c.id, c.size_top, c.corpus_count, f"{100 * c.share:.3f}%", c.rows[0] + 1,
             "" if c.n_poison is None else c.n_poison, c.caption) for c in clusters if c.size_top > 1]
    parts += ["<h2>Clusters of more than one sample</h2>",
              _table(rows, ["cluster", "in top N", "like it in corpus", "share of corpus", "best rank",
                            "known poisons", "caption (most common)"]) if rows else "<p>none</p>"]
    if inversion:
        parts.append("<h2>Trigger inversion</h2>")
        for inv in inversion:
            imgs = "".join(f'<img src="{u}" alt="{escape(k)}" title="{escape(k)}">' for k, u in inv["pngs"].items())
            parts.append(f'<div class="inv"><b>{escape(inv["role"])}</b>: “{escape(inv["caption"])}” — ASR '
                         f'{inv["asr"]:.3f} (excl. its class {inv["asr_excl"]:.3f}), mask L1 {inv["mask_l1"]:.1f} px '
                         f'of {inv["pixels"]}<br>{imgs}</div>')
    parts.append("<h2>Samples, by cluster</h2>")
    for c in clusters:
        cards = "".join(_card(top, r, thumbs[int(top.index[r])], sort_by) for r in c.rows)
        poison = f", {c.n_poison} known poisons" if c.n_poison else ""
        parts.append(f'<div class="cluster" data-cluster="{c.id}"><h3>cluster {c.id}: {c.size_top} in the top N, '
                     f'{c.corpus_count} like it in the corpus ({100 * c.share:.3f}%){poison} — '
                     f'“{escape(c.caption)}”</h3><div class="grid">{cards}</div></div>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>{"".join(parts)}</body></html>')
