"""The curator's report (clipbd.curation, stage `report`): top-N by chunks, clusters, corpus shares,
and the page itself in a real headless browser (marker `browser`, in make test; CI installs chromium)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from clipbd.curation import report as rep
from conftest import run_cli


def test_top_n_by_chunks_equals_a_full_sort_with_ties_in_index_order():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 50, size=10_000).astype(np.float64)  # many ties
    s[[7, 3000]] = np.nan
    want = np.argsort(-np.where(np.isnan(s), -np.inf, s), kind="stable")[:300]
    for chunk in (97, 1000, 1 << 20):
        assert np.array_equal(rep.top_n(s, 300, chunk=chunk), want), chunk


def test_clusters_join_near_duplicate_images_and_same_captions_only():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 32))
    emb = np.concatenate([base[:1] + 0.01 * rng.normal(size=(4, 32)), base[1:]])  # rows 0-3 near-identical
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    caps = ["cake", "x", "y", "z", "A red  circle!", "a red circle", "the dog", "a cat", "blue", "green"][:len(emb)]
    ids = rep.cluster_rows(emb, caps, threshold=0.95)
    assert len(set(ids[:4])) == 1  # images, whatever the captions
    assert ids[4] == ids[5] != ids[0]  # captions equal after normalisation
    assert len(set(ids[6:])) == len(ids[6:]) and not set(ids[6:]) & set(ids[:6])
    assert ids[0] == 0 and list(dict.fromkeys(ids)) == sorted(set(ids))  # ordered by best rank


def test_a_caption_two_rows_share_does_not_chain_clusters_at_min_count_three():
    # the icon-motif run's chain: rows 0-2 one motif (images), row 3 near a motif image and sharing a
    # common caption with row 4, which is near-identical to row 5 (placeholders)
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 32))
    emb = np.stack([a + 0.01 * rng.normal(size=32) for _ in range(4)] + [b + 0.01 * rng.normal(size=32) for _ in range(2)])
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    caps = ["cake", "cake", "cake", "a red triangle", "A red triangle.", "a star"]
    assert len(set(rep.cluster_rows(emb, caps, 0.95, min_caption_count=2))) == 1  # chained
    ids = rep.cluster_rows(emb, caps, 0.95, min_caption_count=3)
    assert ids.tolist() == [0, 0, 0, 0, 1, 1]
    caps3 = caps[:5] + ["a red triangle"]  # three carriers: a caption cluster again
    assert len(set(rep.cluster_rows(emb, caps3, 0.95, min_caption_count=3))) == 1
    assert rep.shared_captions(caps, ids, min_count=3) == [{"cake"}, set()]


def test_corpus_counts_stream_equals_brute_force(tmp_path):
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(5000, 16)).astype(np.float32)
    emb[:300] = emb[0] + 0.05 * rng.normal(size=(300, 16))
    files = []
    for i, part in enumerate(np.array_split(emb, 3)):
        files.append(tmp_path / f"extract-{i:05d}.h5")
        with h5py.File(files[-1], "w") as f:
            f["image_emb"] = part
    cents = rep._unit(emb[[0, 1000, 4000]])
    caps = np.array([f"cap {i % 7}" for i in range(5000)])
    for i, part in enumerate(np.array_split(caps, 3)):
        with h5py.File(files[i], "a") as f:
            f["caption"] = part.astype(object)
    counts, total = rep.corpus_counts(files, cents, 0.9, chunk=333)
    unit = rep._unit(emb)
    near = (unit @ cents.T) > 0.9
    assert total == 5000 and counts.tolist() == near.sum(0).tolist()
    assert counts[0] >= 300
    by_caption, _ = rep.corpus_counts(files, cents, 0.9, captions=[{"cap 3"}, set(), {"cap 1", "cap 2"}], chunk=333)
    want = near | np.stack([caps == "cap 3", np.zeros(5000, bool), np.isin(caps, ["cap 1", "cap 2"])], 1)
    assert by_caption.tolist() == want.sum(0).tolist()


def test_only_captions_two_members_share_count_a_cluster_into_the_corpus():
    # a placeholder cluster: one picture, every member its own ordinary caption -> no caption counts;
    # a motif cluster: one caption on every member -> that caption counts (whatever the punctuation)
    caps = ["a red circle", "a blue star", "there is a ring", "The cake!", "the cake", "cake", "a cat"]
    cluster = np.array([0, 0, 0, 1, 1, 1, 2])
    assert rep.shared_captions(caps, cluster) == [set(), {"cake"}, set()]


def test_streaming_histogram_counts_every_finite_score():
    s = np.r_[np.linspace(0, 1, 1001), np.nan]
    h = rep.histogram(s, bins=10, chunk=100, labels=np.r_[np.ones(10), np.zeros(992)])
    assert h["counts"].sum() == 1001 and h["poison"].sum() == 10 and len(h["edges"]) == 11


def test_report_marks_the_known_poisons_and_lists_clusters(smoke_run):
    run_dir = smoke_run[0]
    page = (run_dir / "report" / "index.html").read_text()
    stated = int(re.search(r'id="summary" data-count="(\d+)"', page).group(1))
    assert stated == 200 == page.count('class="thumb"')  # report.top_n of the 400 samples
    with h5py.File(run_dir / "scores.h5") as f:
        top = rep.top_n(f["dao"][()], 200)
        n_poison = int(f["is_poison"][()][top].sum())
    assert page.count("<span class=badge>POISON</span>") == n_poison
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    with open(run_dir / "report" / "clusters.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(int(r["size_top"]) for r in rows) == 200
    assert all(0 < float(r["share_corpus"]) <= 1 for r in rows)
    # W&B (offline in the smoke run): the top-N table, with thumbnails, and the cluster table
    tables = [p.name for p in (run_dir / "wandb").glob("offline-run-*/files/media/table/report/*.table.json")]
    assert any(t.startswith("top_") for t in tables) and any(t.startswith("clusters_") for t in tables)
    top_table = json.loads(next((run_dir / "wandb").glob("offline-run-*/files/media/table/report/top_*")).read_text())
    assert len(top_table["data"]) == 200


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.browser
def test_report_renders_in_headless_chromium_with_every_thumbnail_loaded(smoke_run, tmp_path):
    exe = _chromium()
    if exe is None:
        if os.environ.get("CLIPBD_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH (CI installs it in .ci/run: apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    page = smoke_run[0] / "report" / "index.html"
    stated = int(re.search(r'data-count="(\d+)"', page.read_text()).group(1))
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    loaded = int(re.search(r'data-thumbs-loaded="(\d+)"', body).group(1))
    total = int(re.search(r'data-thumbs-total="(\d+)"', body).group(1))
    assert loaded == total == stated > 0
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one


def test_report_alone_on_a_finished_run_changes_no_other_artifact(smoke_run, tmp_path):
    src = smoke_run[0]
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("wandb", "epoch_*.pt"))
    shutil.rmtree(run_dir / "report")
    before = {p: p.read_bytes() for p in (run_dir / "metrics.json", run_dir / "scores.h5", run_dir / "ranked.csv")}
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={run_dir}", "stages=[report]", "report.top_n=50",
                   "logging.wandb.mode=disabled")
    assert "stage report   done" in proc.stderr
    assert (run_dir / "report" / "index.html").read_text().count('class="thumb"') == 50
    assert all(p.read_bytes() == b for p, b in before.items())
