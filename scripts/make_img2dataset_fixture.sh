#!/usr/bin/env bash
# Regenerate tests/data/img2dataset/: webdataset shards written by the REAL img2dataset tool.
#
# What it does:
#   1. installs img2dataset (pinned) into a throwaway venv ($I2D_VENV, default /tmp/i2d-venv) - it
#      pins old libraries that conflict with ours, so it never goes into the project's venv;
#   2. writes 14 small synthetic images (32 px, clipbd.data.synthetic) and a url+caption CSV
#      (scripts/make_img2dataset_fixture.py serve-dir) laid out, at 4 samples per shard, as
#        shard 00000: ok ok 404 ok         -> 3 successes
#        shard 00001: 404 404 404 404      -> 0 successes (an empty tar)
#        shard 00002: png ok not-an-image ok -> 3 successes (png re-encoded to jpg)
#        shard 00003: ok ok                -> 2 successes (partial last shard)
#   3. serves them from python's http.server bound to 127.0.0.1 only (stopped on exit);
#   4. runs img2dataset --output_format webdataset --number_sample_per_shard 4 over the CSV;
#   5. copies every shard's .tar, _stats.json and .parquet into tests/data/img2dataset/ and writes
#      expected.json (key/status/caption per input row, read from the parquet files with pyarrow
#      from the throwaway venv, so the tests themselves need no pyarrow).
# Needs: network access to PyPI only for step 1 (once); the project venv at .venv for step 2.
# Usage: scripts/make_img2dataset_fixture.sh   (from anywhere; takes ~1 min the first time)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/tests/data/img2dataset"
I2D_VENV="${I2D_VENV:-/tmp/i2d-venv}"
I2D_VERSION="1.47.0"
PY="$ROOT/.venv/bin/python"
HELPER="$ROOT/scripts/make_img2dataset_fixture.py"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if ! "$I2D_VENV/bin/python" -c "import img2dataset" 2>/dev/null; then
  python3 -m venv "$I2D_VENV"
  "$I2D_VENV/bin/pip" install -q "img2dataset==$I2D_VERSION"
fi

PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PY" "$HELPER" serve-dir "$WORK/www" "$WORK/urls.csv" "$PORT"
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORK/www" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 50); do  # wait until the server answers
  "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/img00.jpg', timeout=1)" 2>/dev/null && break
  sleep 0.1
done

export no_proxy="127.0.0.1,localhost" NO_PROXY="127.0.0.1,localhost" NO_ALBUMENTATIONS_UPDATE=1
"$I2D_VENV/bin/img2dataset" \
  --url_list "$WORK/urls.csv" --input_format csv --url_col url --caption_col caption \
  --output_format webdataset --output_folder "$WORK/out" \
  --number_sample_per_shard 4 --processes_count 1 --thread_count 2 \
  --image_size 32 --resize_mode border --timeout 5 --retries 0 \
  --disallowed_header_directives '[]' --enable_wandb False

rm -rf "$DEST"
mkdir -p "$DEST"
cp "$WORK"/out/*.tar "$WORK"/out/*_stats.json "$WORK"/out/*.parquet "$DEST"/
"$I2D_VENV/bin/python" "$HELPER" expected "$DEST"
"$I2D_VENV/bin/python" -c "import img2dataset, importlib.metadata as m; print('img2dataset', m.version('img2dataset'), 'webdataset', m.version('webdataset'))" \
  > "$DEST/VERSION"
ls -l "$DEST"
du -sh "$DEST"
