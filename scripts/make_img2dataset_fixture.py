"""Helper of scripts/make_img2dataset_fixture.sh (see its header). Two sub-commands:

  serve-dir WWW URLS_CSV PORT   write small images (+ one non-image file) into WWW and the url/caption
                                list URLS_CSV, laid out so that img2dataset (4 samples per shard) makes
                                shards with some failures, one with zero successes, and a partial last one
  expected OUT                  (run with the img2dataset venv's python: needs pyarrow) summarise the
                                `.parquet` files in OUT into OUT/expected.json so tests need no pyarrow
"""

import csv
import glob
import json
import os
import sys


def make_inputs(www: str, urls_csv: str, port: int) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from clipbd.data.synthetic import WorldConfig, generate_sample, sample_rng

    world = WorldConfig(image_size=32)
    os.makedirs(www, exist_ok=True)
    # One entry per input row; shards of 4 rows: [ok ok 404 ok] [404 x4] [png ok garbage ok] [ok ok]
    plan = ["jpg", "jpg", "404", "jpg", "404", "404", "404", "404", "png", "jpg", "garbage", "jpg", "jpg", "jpg"]
    rows = []
    for i, kind in enumerate(plan):
        image, caption, _ = generate_sample(sample_rng(1234, "fixture", i), world)
        if i == 3:
            caption = "un café crème ☕ — \"quoted\", with a comma"  # non-ASCII and CSV quoting
        name = f"img{i:02d}.{'png' if kind == 'png' else 'jpg'}"
        if kind in ("jpg", "png"):
            image.save(os.path.join(www, name), **({"quality": 90} if kind == "jpg" else {}))
        elif kind == "garbage":  # served fine, but not an image: img2dataset fails to decode it
            with open(os.path.join(www, name), "wb") as f:
                f.write(b"this is not an image\n" * 8)
        rows.append({"url": f"http://127.0.0.1:{port}/{name}", "caption": caption})
    with open(urls_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["url", "caption"])
        writer.writeheader()
        writer.writerows(rows)


def write_expected(out: str) -> None:
    import pyarrow.parquet as pq

    shards = {}
    for path in sorted(glob.glob(os.path.join(out, "*.parquet"))):
        table = pq.read_table(path).to_pylist()
        shards[os.path.basename(path)[: -len(".parquet")] + ".tar"] = [
            {"key": r["key"], "status": r["status"], "caption": r["caption"], "error_message": r["error_message"]}
            for r in table]
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"about": "key/status/caption of every input row, from img2dataset's .parquet files "
                            "(written by scripts/make_img2dataset_fixture.sh)", "shards": shards},
                  f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    if sys.argv[1] == "serve-dir":
        make_inputs(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "expected":
        write_expected(sys.argv[2])
    else:
        raise SystemExit(__doc__)
