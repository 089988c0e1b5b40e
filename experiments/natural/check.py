"""Where the natural backdoors of a `+experiment=natural` run land (the issue's bar):

    python experiments/natural/check.py RUN_DIR [--top 0.02]

For the motif and the placeholder samples (json meta "natural"): the share of them ranked in the top
`--top` of ranked.csv, and the report clusters (report/clusters.csv) their top-N members fall in.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

from clipbd.data.shards import iter_shard


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--top", type=float, default=0.02)
    args = ap.parse_args()
    shards = json.loads((args.run / "data.json").read_text())["train_shards"]
    kind = {s.key: s.meta["natural"] for p in shards for s in iter_shard(p) if s.meta.get("natural")}
    with open(args.run / "ranked.csv", newline="") as fh:
        keys = [r["key"] for r in csv.DictReader(fh)]
    top = set(keys[:int(round(args.top * len(keys)))])
    cluster_of = {}
    with open(args.run / "report" / "clusters.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            cluster_of |= {k: int(r["cluster"]) for k in r["keys"].split(";")}
    out = {}
    for k in ("motif", "placeholder"):
        members = [key for key, v in kind.items() if v == k]
        in_top = sum(m in top for m in members)
        clusters = Counter(cluster_of[m] for m in members if m in cluster_of)
        out[k] = {"count": len(members), "in_top": in_top, "share_in_top": in_top / max(1, len(members)),
                  "report_clusters": dict(clusters)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
