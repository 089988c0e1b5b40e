"""The curator's report: the top of a run's ranking, as pictures, grouped into clusters.

Sized for millions of samples: only the top `n` rows of the ranking are ever held (scores read in
chunks, `argpartition` per chunk), clusters are formed among those `n`, and a cluster's share of
the corpus is counted in one streaming pass over the extraction files (memory: one file's
embeddings and the cluster centroids). Every function here is pure apart from reading the files it
is handed; the HTML is rendered by `clipbd.curation.html`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

CHUNK = 1 << 20  # rows of a score vector read at a time


# ----------------------------------------------------------------------------- the top of the ranking
def top_n(scores: h5py.Dataset | np.ndarray, n: int, chunk: int = CHUNK) -> np.ndarray:
    """Positions of the `n` highest values of a 1-d score vector [N], most suspicious first, ties in
    index order (ranked.csv's order). Reads `chunk` rows at a time; holds at most n + chunk values."""
    total = scores.shape[0]
    best_idx = np.zeros(0, dtype=np.int64)
    best_val = np.zeros(0, dtype=np.float64)
    for lo in range(0, total, chunk):
        vals = np.asarray(scores[lo:min(lo + chunk, total)], dtype=np.float64)
        idx = np.arange(lo, lo + len(vals), dtype=np.int64)
        vals = np.where(np.isnan(vals), -np.inf, vals)  # an unscored sample ranks last
        if len(vals) > n:  # this chunk's top n, and every tie of the n-th (the lowest indices win below)
            cut = -np.partition(-vals, n - 1)[n - 1]
            keep = vals >= cut
            idx, vals = idx[keep], vals[keep]
        best_idx, best_val = np.concatenate([best_idx, idx]), np.concatenate([best_val, vals])
        order = np.lexsort((best_idx, -best_val))[:n]  # score descending, then index ascending
        best_idx, best_val = best_idx[order], best_val[order]
    return best_idx


def histogram(scores: h5py.Dataset | np.ndarray, bins: int = 40, chunk: int = CHUNK,
              labels: h5py.Dataset | np.ndarray | None = None) -> dict:
    """Streaming histogram of a score vector (two chunked passes: range, then counts); with
    `labels` [N] (1 = poison) the poisons' counts separately. {edges [bins+1], counts, poison}."""
    total = scores.shape[0]
    lo, hi = np.inf, -np.inf
    for s in range(0, total, chunk):
        v = np.asarray(scores[s:s + chunk], dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v):
            lo, hi = min(lo, v.min()), max(hi, v.max())
    if not np.isfinite(lo):
        lo, hi = 0.0, 1.0
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts, poison = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    for s in range(0, total, chunk):
        v = np.asarray(scores[s:s + chunk], dtype=np.float64)
        ok = np.isfinite(v)
        counts += np.histogram(v[ok], edges)[0]
        if labels is not None:
            y = np.asarray(labels[s:s + chunk]).astype(bool)
            poison += np.histogram(v[ok & y], edges)[0]
    return {"edges": edges, "counts": counts, "poison": poison if labels is not None else None}


# ----------------------------------------------------------------------------- rows of the top samples
@dataclass
class TopRows:
    """The top-N samples: global index, rank (0 = most suspicious), key, caption, scores, image
    embedding (unit rows), poison flag (None without labels)."""

    index: np.ndarray                      # [n] int64
    key: list[str]
    caption: list[str]
    scores: dict[str, np.ndarray]          # detector -> [n]
    image_emb: np.ndarray                  # [n, D] float32, L2-normalised
    is_poison: np.ndarray | None = None    # [n] bool
    cluster: np.ndarray = field(default=None)  # [n] cluster id (clusters ordered by best rank)


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def load_top(scores_h5: Path, extract_files: Sequence[Path], sort_by: str, n: int) -> TopRows:
    """Read the top `n` samples by `sort_by` from scores.h5, and their captions and image embeddings
    from the extraction files (each file's `index` column is read; rows are fetched by position)."""
    with h5py.File(scores_h5, "r") as f:
        detectors = [_s(d) for d in f.attrs["detectors"]]
        pos = top_n(f[sort_by], n)
        srt = np.sort(pos)  # h5py reads rows at increasing positions
        back = np.searchsorted(srt, pos)
        index = f["index"][srt][back].astype(np.int64)
        keys = [_s(k) for k in f["key"][srt][back]]
        scores = {d: f[d][srt][back].astype(np.float64) for d in detectors}
        labels = f["is_poison"][srt][back].astype(bool) if "is_poison" in f else None
    caption, emb = [""] * len(index), [None] * len(index)
    where = {int(g): i for i, g in enumerate(index)}
    for p in extract_files:
        with h5py.File(p, "r") as f:
            file_index = f["index"][()]
            rows = np.nonzero(np.isin(file_index, index))[0]
            if not len(rows):
                continue
            caps, vecs = f["caption"][rows], f["image_emb"][rows]
            for r, c, v in zip(rows, caps, vecs):
                i = where[int(file_index[r])]
                caption[i], emb[i] = _s(c), v
    missing = [int(index[i]) for i, v in enumerate(emb) if v is None]
    if missing:
        raise FileNotFoundError(f"report: samples {missing[:5]} are in scores.h5 but in no extraction file; "
                                "re-run extract and reduce")
    return TopRows(index, keys, caption, scores, _unit(np.stack(emb)), labels)


# ----------------------------------------------------------------------------- clusters
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of in on at to with and is are this that there showing picture image photo "
                  "coloured colored against background".split())


def normalise_caption(caption: str) -> str:
    """Lower case, punctuation and filler words dropped: captions that differ only in those match."""
    return " ".join(w for w in _WORD.findall(caption.lower()) if w not in _STOP)


def _union_find(n: int, edges: Iterable[tuple[int, int]]) -> np.ndarray:
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)])


def cluster_rows(image_emb: np.ndarray, captions: Sequence[str], threshold: float,
                 min_caption_count: int = 2) -> np.ndarray:
    """Connected components among the top rows [n, D] (unit): an edge joins two rows whose image
    embeddings have cosine > `threshold`, or whose captions are equal after `normalise_caption` and
    carried by at least `min_caption_count` of the rows (two rows that happen to share a common
    caption would otherwise chain two unrelated clusters together).
    Returns [n] cluster ids 0.. in order of each cluster's first (best-ranked) row."""
    n = len(captions)
    sim = image_emb @ image_emb.T
    a, b = np.nonzero(np.triu(sim > threshold, k=1))
    norm = [normalise_caption(c) for c in captions]
    count = Counter(norm)
    first: dict[str, int] = {}
    cap_edges = []
    for i, c in enumerate(norm):
        if count[c] < max(2, min_caption_count):
            continue
        if c in first:
            cap_edges.append((first[c], i))
        else:
            first[c] = i
    roots = _union_find(n, list(zip(a.tolist(), b.tolist())) + cap_edges)
    _, ids = np.unique(roots, return_inverse=True)  # roots are each component's smallest (best) row
    return ids.astype(np.int64)


def centroids(image_emb: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """[C, D] unit mean image embedding of each cluster (ids 0..C-1)."""
    c = np.zeros((cluster.max() + 1, image_emb.shape[1]), dtype=np.float64)
    np.add.at(c, cluster, image_emb)
    return _unit(c)


def shared_captions(captions: Sequence[str], cluster: np.ndarray, min_count: int = 2) -> list[set[str]]:
    """Per cluster, the normalised captions that at least `min_count` (>= 2) of its top members
    carry: the captions that make it a caption cluster. A caption only one member has (a placeholder
    picture's ordinary caption, say) says nothing about the cluster, and counting the corpus samples
    that share it would inflate the cluster's corpus share."""
    out: list[Counter] = [Counter() for _ in range(int(cluster.max()) + 1 if len(cluster) else 0)]
    for cap, c in zip(captions, cluster.tolist()):
        out[c][normalise_caption(cap)] += 1
    return [{cap for cap, n in cnt.items() if n >= max(2, min_count)} for cnt in out]


def corpus_counts(extract_files: Sequence[Path], cents: np.ndarray, threshold: float,
                  captions: Sequence[set[str]] | None = None, chunk: int = 65536) -> tuple[np.ndarray, int]:
    """How many samples of the whole corpus belong to each cluster by the clustering's own rule: an
    image embedding within cosine > `threshold` of the cluster's centroid (cents [C, D]), or a
    caption that normalises to one of the cluster's (`captions[c]`, sets of normalised captions).
    One streaming pass over the extraction files, `chunk` rows at a time. Returns (counts [C], N)."""
    counts, total = np.zeros(len(cents), dtype=np.int64), 0
    owner: dict[str, list[int]] = {}
    for c, caps in enumerate(captions or []):
        for cap in caps:
            owner.setdefault(cap, []).append(c)
    for p in extract_files:
        with h5py.File(p, "r") as f:
            ds = f["image_emb"]
            for lo in range(0, ds.shape[0], chunk):
                hit = (_unit(ds[lo:lo + chunk]) @ cents.T.astype(np.float32)) > threshold  # [b, C]
                if owner:
                    for i, cap in enumerate(f["caption"][lo:lo + chunk]):
                        for c in owner.get(normalise_caption(_s(cap)), ()):
                            hit[i, c] = True
                counts += hit.sum(0)
                total += len(hit)
    return counts, total


@dataclass
class Cluster:
    id: int
    rows: list[int]        # positions in TopRows, best rank first
    size_top: int          # members among the top N
    corpus_count: int      # near-duplicates of the centroid in the whole corpus
    share: float           # corpus_count / corpus size
    caption: str           # the most common caption of the members (ties: the best-ranked)
    n_poison: int | None


def summarise(top: TopRows, counts: np.ndarray, corpus_size: int) -> list[Cluster]:
    out = []
    for c in range(int(top.cluster.max()) + 1 if len(top.index) else 0):
        rows = np.nonzero(top.cluster == c)[0].tolist()
        caps = [top.caption[r] for r in rows]
        caption = max(dict.fromkeys(caps), key=caps.count)
        n_poison = int(top.is_poison[rows].sum()) if top.is_poison is not None else None
        out.append(Cluster(c, rows, len(rows), int(counts[c]), counts[c] / max(1, corpus_size), caption, n_poison))
    return out


def write_clusters_csv(path: Path, clusters: Sequence[Cluster], top: TopRows) -> None:
    import csv

    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["cluster", "size_top", "corpus_count", "share_corpus", "best_rank", "n_poison", "caption",
                    "keys"])
        for c in clusters:
            w.writerow([c.id, c.size_top, c.corpus_count, f"{c.share:.6g}", c.rows[0] + 1,
                        "" if c.n_poison is None else c.n_poison, c.caption,
                        ";".join(top.key[r] for r in c.rows)])
    tmp.replace(path)


def read_inversions(run_dir: Path) -> list[dict]:
    """The `invert` stage's results (invert/summary.json), its PNGs as data URIs, for the page."""
    import base64
    import json

    path = Path(run_dir) / "invert" / "summary.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    for r in rows:
        r["pngs"] = {name: "data:image/png;base64," + base64.b64encode((path.parent / f).read_bytes()).decode()
                     for name, f in r["files"].items() if (path.parent / f).exists()}
    return rows
