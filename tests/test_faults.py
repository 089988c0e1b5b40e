"""Fault injection: a SIGKILL in every stage, bad samples and shards, a full disk during a checkpoint.

- SIGKILL: one run directory is killed once inside each stage in turn (on a log line the stage
  writes while working) and resumed each time; the artifacts equal those of an uninterrupted run.
- Bad data, one fault per shard: a truncated shard, a corrupt JPEG, a non-UTF-8 caption, a sample
  without its caption, a key repeated in another shard, a 0-byte shard. data.on_error=skip leaves
  exactly the bad sample out for every stage and lists it (skipped.csv, data/skipped/<reason> in
  metrics.json); data.on_error=raise stops with the one-line error.
- A full disk while a checkpoint is written (a small tmpfs, or a failing write where mounting is
  not allowed): the previous checkpoint still loads and no partial file is left.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from PIL import Image

from clipbd.data.shards import DataError, ShardWriter, build_index, decode_image

pytestmark = pytest.mark.faults

# two epochs: a kill can land between checkpoints; no W&B (seconds per start, not under test here)
SMOKE2 = ["+experiment=smoke", "train.epochs=2", "logging.wandb.mode=disabled"]


# --- shards with one fault each ---------------------------------------------------------------


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def _members(keys, prefix: str) -> list[tuple[str, bytes]]:
    out = []
    for i, k in enumerate(keys):
        out += [(f"{k}.jpg", _jpeg(i)), (f"{k}.json", json.dumps({"key": k}).encode()),
                (f"{k}.txt", f"a photo {prefix} {i}".encode())]
    return out


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _keys(shard: int, n: int = 6) -> list[str]:
    return [f"{shard:04d}{i:05d}" for i in range(n)]


def _replace(members, name: str, data: bytes | None):
    """`members` with member `name`'s bytes replaced (None: removed)."""
    return [(n, data if n == name else d) for n, d in members if not (n == name and data is None)]


FAULTS = {  # reason -> (how shard i is made, the member/key skipped.csv names)
    "truncated_shard": "the last sample's caption cut in half, no end-of-archive blocks",
    "corrupt_image": "sample 2's JPEG is garbage after its header",
    "bad_caption": "sample 2's caption is Latin-1, not UTF-8",
    "missing_member": "sample 2 has no caption",
    "duplicate_key": "sample 2 repeats a key of shard 0",
    "empty_shard": "a 0-byte file",
}


def fault_shards(root: Path) -> tuple[list[str], dict[str, dict]]:
    """A clean shard 0, then one shard per fault; returns the paths and, per fault, the shard, the
    expected skipped.csv member, and the keys that survive."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [str(_tar(root / "s-00000.tar", _members(_keys(0), "clean")))]
    expect: dict[str, dict] = {}
    for sid, reason in enumerate(FAULTS, start=1):
        keys = _keys(sid)
        members = _members(keys, reason)
        bad = keys[2]
        if reason == "corrupt_image":
            members = _replace(members, f"{bad}.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
        elif reason == "bad_caption":
            members = _replace(members, f"{bad}.txt", "café au lait".encode("latin-1"))
        elif reason == "missing_member":
            members = _replace(members, f"{bad}.txt", None)
        elif reason == "duplicate_key":
            bad = _keys(0)[2]
            members = [(n.replace(keys[2], bad), d) for n, d in members]
        path = root / f"s-{sid:05d}.tar"
        if reason == "empty_shard":
            path.write_bytes(b"")
            keys, bad = [], ""
        else:
            _tar(path, members)
        if reason == "truncated_shard":
            with tarfile.open(path) as tf:
                last = tf.getmembers()[-1]
            with open(path, "r+b") as fh:
                fh.truncate(last.offset_data + last.size // 2)
            bad = last.name
            keys = keys[:-1]  # the sample being read when the tar broke off goes with it
        else:
            keys = [k for k in keys if k != keys[2]] if reason != "empty_shard" else keys
        expect[reason] = {"shard": str(path), "member": bad, "kept": keys}
        paths.append(str(path))
    return paths, expect


@pytest.fixture
def bad_shards(tmp_path):
    return fault_shards(tmp_path / "shards")


def _one_line(msg: str, *needles: str) -> None:
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


# --- bad data in the library: the index decides once -------------------------------------------


@pytest.mark.parametrize("reason", list(FAULTS))
def test_skip_leaves_out_exactly_the_bad_sample(bad_shards, reason):
    paths, expect = bad_shards
    e = expect[reason]
    shards = [paths[0], e["shard"]]
    index = build_index(shards, progress=False, on_error="skip")
    assert [(r.shard, r.member, r.reason) for r in index.skipped] == [(e["shard"], e["member"], reason)]
    assert index.skip_counts() == {reason: 1}
    assert index.keys.tolist() == _keys(0) + e["kept"]
    # every reader goes through the index: exactly its samples, positions counted among them
    for sid in range(len(shards)):
        got = list(index.read(sid))
        lo = int(index.offsets[sid])
        assert [s.key for s in got] == index.keys[lo:lo + int(index.counts[sid])].tolist()
        assert [s.pos for s in got] == list(range(len(got)))
        for s in got:
            decode_image(s)
    assert [m.rsplit(".", 1)[1] for m in index.members] == ["jpg"] * len(index)


@pytest.mark.parametrize("reason", list(FAULTS))
def test_raise_stops_at_the_bad_sample_in_one_line(bad_shards, reason):
    paths, expect = bad_shards
    e = expect[reason]
    needle = {"truncated_shard": "corrupt shard", "corrupt_image": "corrupt image", "bad_caption": "not UTF-8",
              "missing_member": "needs an image", "duplicate_key": "duplicate key",
              "empty_shard": "empty shard"}[reason]
    with pytest.raises(DataError) as err:
        # training's path: the header-only index, then every sample read and decoded by the loader
        index = build_index([paths[0], e["shard"]], progress=False, on_error="raise")
        for sid in range(len(index.shards)):
            for s in index.read(sid):
                decode_image(s, f"{index.shards[sid]}:{s.key}")
    _one_line(str(err.value), needle, Path(e["shard"]).name)
    assert err.value.reason == reason
    if reason == "duplicate_key":  # names the key and both shards
        _one_line(str(err.value), e["member"], Path(paths[0]).name)


def test_index_with_skips_round_trips(bad_shards, tmp_path):
    paths, _ = bad_shards
    index = build_index(paths, progress=False, on_error="skip")
    index.save(tmp_path / "i.h5")
    back = type(index).load(tmp_path / "i.h5")
    assert back.skipped == index.skipped and back.fingerprint() == index.fingerprint()
    for name in ("keys", "counts", "positions", "members"):
        assert np.array_equal(getattr(back, name), getattr(index, name)), name
    clean = build_index(paths[:1], progress=False, on_error="skip")
    assert clean.fingerprint() == build_index(paths[:1], progress=False).fingerprint()  # nothing left out


# --- bad data through the CLI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted two-epoch smoke run: the reference artifacts and a checkpoint to scan with."""
    run_dir = tmp_path_factory.mktemp("faults") / "ref"
    run_cli(*SMOKE2, f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.mark.slow  # end-to-end through the CLI (make test runs it; make test-fast skips it)
def test_scan_skips_and_lists_every_fault(reference_run, tmp_path):
    paths, expect = fault_shards(tmp_path / "shards")
    run_dir = tmp_path / "scan"
    proc = run_cli("+experiment=scan", f"dataset.shards={tmp_path}/shards", f"hydra.run.dir={run_dir}",
                   f"model.checkpoint={reference_run}/checkpoints/latest.pt", "scoring.batch_size=8",
                   "detector=[lid,dao,slof,kdist]", *[f"detector.{d}.k=3" for d in ("dao", "slof", "kdist", "lid")])
    with open(run_dir / "skipped.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["shard"], r["member"], r["reason"]) for r in rows} == {
        (e["shard"], e["member"], reason) for reason, e in expect.items()}
    assert all(r["message"] for r in rows)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k.startswith("data/")} == {
        **{f"data/skipped/{r}": 1 for r in FAULTS}, "data/skipped/total": len(FAULTS)}
    assert "AUROC" in metrics["detect/note"]  # reduce accepted the coverage: skipped ones are not missing
    for reason in FAULTS:
        assert f"skipped 1 x {reason}" in proc.stderr
    with open(run_dir / "ranked.csv", newline="") as fh:
        ranked = list(csv.DictReader(fh))
    kept = [(paths[0], k) for k in _keys(0)] + [(e["shard"], k) for e in expect.values() for k in e["kept"]]
    assert sorted((r["shard"], r["key"]) for r in ranked) == sorted(kept)
    assert all(r["member"] == f"{r['key']}.jpg" for r in ranked)
    # LID is listed first but has no fixed direction: ranked by DAO, and scores.h5 says so
    assert [float(r["dao"]) for r in ranked] == sorted((float(r["dao"]) for r in ranked), reverse=True)
    with h5py.File(run_dir / "scores.h5", "r") as f:
        assert f.attrs["ranked_by"] == "dao"
    assert sorted(int(r["index"]) for r in ranked) == list(range(len(kept)))


@pytest.mark.slow  # end-to-end through the CLI (make test runs it; make test-fast skips it)
def test_training_refuses_a_duplicate_key_in_one_line(tmp_path):
    paths, expect = fault_shards(tmp_path / "shards")
    dup = expect["duplicate_key"]
    proc = run_cli("+experiment=smoke", "dataset=webdataset", f"dataset.shards=[{paths[0]},{dup['shard']}]",
                   f"hydra.run.dir={tmp_path}/r", "stages=[data,poison,pretrain]", check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("clipbd: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    _one_line(errors[0], "duplicate key", dup["member"], Path(paths[0]).name, Path(dup["shard"]).name)
    assert "stage pretrain running" not in proc.stderr.replace("  ", " ")


# --- SIGKILL inside every stage, then resume -------------------------------------------------------

# (stage, a line the stage logs while it works): the kill lands inside the stage
KILL_POINTS = [("data", "writing synthetic shards"), ("poison", "stage poison   running"),
               ("pretrain", "epoch 1/2"), ("extract", "wrote extract-00000.h5"),
               ("reduce", "stage reduce   running"), ("report", "stage report   running"),
               ("evaluate", "stage evaluate running")]


def _run_and_kill(args: list[str], line: str, timeout: float = 300) -> str:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "clipbd.run", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen = []
    try:
        for ln in proc.stderr:
            seen.append(ln)
            if line in ln:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and any helper process it started (W&B)
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"never saw {line!r}:\n{''.join(seen)[-3000:]}"
    return "".join(seen)


def _artifacts(run_dir: Path) -> dict[str, object]:
    """What a run produced, comparable across run directories (shard paths as file names)."""
    out: dict[str, object] = {}
    for rel in ("poison_plan.json", "train_loss.csv", "data/train-00000.tar", "data/test-00000.tar",
                "report/clusters.csv"):
        out[rel] = (run_dir / rel).read_bytes()
    out["metrics.json"] = json.loads((run_dir / "metrics.json").read_text())
    with h5py.File(run_dir / "scores.h5", "r") as f:
        out |= {f"scores.h5:{k}": f[k][()].tolist() for k in f}
    with open(run_dir / "ranked.csv", newline="") as fh:
        out["ranked.csv"] = [{**r, "shard": Path(r["shard"]).name} for r in csv.DictReader(fh)]
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    out |= {f"model:{k}": v.numpy().tobytes() for k, v in ckpt["model"].items()}
    for g in sorted((run_dir / "shards").glob("extract-*.h5")):
        with h5py.File(g, "r") as f:
            out |= {f"{g.name}:{k}": f[k][()].tolist() for k in ("index", "key", "image_emb", "text_emb")}
    return out


@pytest.mark.slow  # end-to-end through the CLI (make test runs it; make test-fast skips it)
def test_sigkill_in_every_stage_then_resume_gives_identical_artifacts(reference_run, tmp_path):
    run_dir = tmp_path / "killed"
    args = [*SMOKE2, f"hydra.run.dir={run_dir}"]
    for stage, line in KILL_POINTS:
        log = _run_and_kill(args, line)
        assert f"stage {stage:<8} running" in log
        assert not (run_dir / "stages" / f"{stage}.json").exists(), f"{stage} finished before the kill"
    proc = run_cli(*args)
    assert "stage evaluate done" in proc.stderr
    want, got = _artifacts(reference_run), _artifacts(run_dir)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == want[k], k


# --- a full disk while a checkpoint is written ------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(directory, fill): a 4 MiB tmpfs where mounting is allowed (root), else a directory where
    `fill(free)` makes torch.save fail with ENOSPC once `free` bytes are written."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    if mounted:
        def fill(free: int) -> None:
            st = os.statvfs(mnt)
            filler = st.f_bavail * st.f_frsize - free
            with open(mnt / "filler", "wb") as fh:
                fh.write(b"\0" * max(0, filler))
    else:  # a disk of `free` bytes: writes beyond it fail as a full disk does, after a partial write
        budget: dict[str, int | None] = {"left": None}
        real_save, real_copy = torch.save, shutil.copyfile

        def fill(free: int) -> None:
            budget["left"] = free

        def take(data: bytes, dst) -> None:
            left = budget["left"]
            with open(dst, "wb") as fh:
                fh.write(data if left is None else data[:left])
            if left is not None:
                if len(data) > left:
                    budget["left"] = 0
                    raise OSError(errno.ENOSPC, "No space left on device", str(dst))
                budget["left"] = left - len(data)

        def save(obj, f, *a, **kw):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            take(buf.getvalue(), f)

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(shutil, "copyfile", lambda src, dst, **kw: take(Path(src).read_bytes(), dst))
    try:
        yield mnt, fill, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(mnt)], check=False)


@pytest.mark.parametrize("fails_at", ["epoch file", "latest copy"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(small_disk, fails_at):
    from clipbd.stages.pretrain import _save

    ckpt_dir, fill, _ = small_disk
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 256)).sum().backward()
    opt.step()
    bundle = SimpleNamespace(model=model, name="linear", arch=None)
    _save(ckpt_dir, 1, "k", bundle, opt)
    size = (ckpt_dir / "epoch_1.pt").stat().st_size
    first = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # epoch 2 differs from epoch 1
    fill(size // 2 if fails_at == "epoch file" else size + size // 2)
    # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos"), a copy as OSError
    with pytest.raises((OSError, RuntimeError)):
        _save(ckpt_dir, 2, "k", bundle, opt)
    state = torch.load(ckpt_dir / "latest.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["model"]["weight"], first)
    assert not [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".")]  # no partial file left
    assert (ckpt_dir / "epoch_2.pt").exists() == (fails_at == "latest copy")


def test_on_error_keys_the_data_stage_and_workers_do_not(tmp_path):
    from conftest import compose_cfg

    from clipbd.runstate import stage_key

    key = lambda *o: stage_key(compose_cfg(list(o), run_dir=tmp_path), "data")  # noqa: E731
    assert key() == key("data.workers=4")                 # threads do not change the index
    assert key() != key("data.on_error=skip")             # the index's contents may change
    assert compose_cfg(["+experiment=scan"]).data.on_error == "skip"
    assert compose_cfg([]).data.on_error == "raise"        # training stops at the first bad sample


def test_skip_also_covers_a_non_tar_and_bad_metadata(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01garbage" * 200)
    keys = _keys(7)
    meta = _tar(tmp_path / "meta.tar", _replace(_members(keys, "m"), f"{keys[1]}.json", b"{not json"))
    index = build_index([str(junk), str(meta)], progress=False, on_error="skip")
    assert [(Path(r.shard).name, r.member, r.reason) for r in index.skipped] == [
        ("junk.tar", "", "corrupt_shard"), ("meta.tar", keys[1], "bad_metadata")]
    assert index.counts.tolist() == [0, 5] and [s.key for s in index.read(1)] == keys[:1] + keys[2:]
    assert list(index.read(0)) == []  # a shard the index kept nothing of is never opened
