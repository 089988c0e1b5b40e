"""Data tests: shard IO on tars in tmp_path, the img2dataset fixture, and the synthetic world."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipbd.data import synthetic
from clipbd.data.shards import (DataError, Sample, ShardIndex, ShardWriter, build_index, decode_image,
                                expand_shards, iter_samples, iter_shard, stats_path, write_stats)

I2D = Path(__file__).parent / "data" / "img2dataset"


def _jpeg(color=(200, 30, 30), size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(f"{seed:05d}{i:04d}", _jpeg(tuple(int(c) for c in rng.integers(0, 255, 3))), "jpg",
             f"caption {i} — ünïcode ☕ ", {"i": i, "nested": {"x": [1, 2]}}) for i in range(n)]


def _write(path: Path, samples) -> str:
    with ShardWriter(path) as w:
        for s in samples:
            w.write(*s)
    return str(path)


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.fixture
def three_shards(tmp_path) -> tuple[list[str], list]:
    samples = [_samples(5, 0), _samples(3, 1), _samples(4, 2)]
    paths = [_write(tmp_path / f"part-{i:05d}.tar", s) for i, s in enumerate(samples)]
    return paths, samples


# --- writing and reading ---------------------------------------------------------------------


def test_write_read_roundtrip(three_shards):
    paths, samples = three_shards
    for path, expected in zip(paths, samples):
        got = list(iter_shard(path))
        assert [s.pos for s in got] == list(range(len(expected)))
        for s, (key, image, ext, caption, meta) in zip(got, expected):
            assert (s.key, s.image, s.ext, s.caption, s.meta) == (key, image, ext, caption, meta)
    flat = [s for _, s in iter_samples(paths)]
    assert [g for g, _ in iter_samples(paths)] == list(range(12))
    assert [s.key for s in flat] == [k for ss in samples for k, *_ in ss]


def test_writer_is_atomic_and_checks_keys(tmp_path):
    path = tmp_path / "x.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as w:
            w.write("k1", _jpeg(), "jpg", "a", {})
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with ShardWriter(path) as w:
        w.write("k1", _jpeg(), "jpg", "a", {})
        with pytest.raises(DataError, match="k1"):
            w.write("k1", _jpeg(), "jpg", "b", {})
    assert [s.key for s in iter_shard(path)] == ["k1"]


def test_write_stats_like_img2dataset(tmp_path):
    path = _write(tmp_path / "00007.tar", _samples(2))
    out = write_stats(path, 2)
    assert out == str(tmp_path / "00007_stats.json") == stats_path(path)
    stats = json.loads(Path(out).read_text())
    assert stats["successes"] == 2 and stats["count"] == 2 and stats["status_dict"] == {"success": 2}


def test_extra_members_and_decode(tmp_path):
    path = _raw_tar(tmp_path / "extra.tar", [
        ("a.png", _png_bytes()), ("a.txt", b"cap a"), ("a.json", b'{"x": 1}'),
        ("a.cls", b"3"), ("a.extra.json", b'{"y": 2}'),
        ("b.webp", _webp_bytes()), ("b.txt", b"cap b"),  # no .json: meta is empty
    ])
    a, b = iter_shard(path)
    assert (a.ext, a.caption, a.meta) == ("png", "cap a", {"x": 1, "extra.json": {"y": 2}})
    assert (b.ext, b.meta) == ("webp", {})
    img = decode_image(a)
    assert img.mode == "RGB" and img.size == (4, 4)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (1, 2, 3, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _webp_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, format="WEBP")
    return buf.getvalue()


# --- index -----------------------------------------------------------------------------------


def test_build_index_roundtrip(three_shards, tmp_path):
    paths, samples = three_shards
    idx = build_index(paths, progress=False)
    assert len(idx) == 12
    assert idx.counts.tolist() == [5, 3, 4] and idx.counts.dtype == np.int64
    assert idx.offsets.tolist() == [0, 5, 8]
    assert idx.keys.tolist() == [k for ss in samples for k, *_ in ss]
    shard_ids, pos = idx.locate(np.arange(12))
    assert shard_ids.tolist() == [0] * 5 + [1] * 3 + [2] * 4
    assert pos.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    assert idx.global_index(shard_ids, pos).tolist() == list(range(12))
    assert idx.global_index(2, 1) == 9
    assert idx.index_of(["000020003", "000010000"]).tolist() == [11, 5]
    with pytest.raises(IndexError):
        idx.locate([12])
    with pytest.raises(IndexError):
        idx.global_index(1, 3)
    # the global index agrees with the order iter_samples reads
    for g, s in iter_samples(paths):
        assert idx.keys[g] == s.key
    h5 = tmp_path / "index.h5"
    idx.save(h5)
    back = ShardIndex.load(h5)
    assert back.shards == idx.shards and back.keys.tolist() == idx.keys.tolist()
    assert back.counts.tolist() == idx.counts.tolist() and back.fingerprint() == idx.fingerprint()
    assert back.stale_shards() == []
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    _write(Path(paths[1]), _samples(2, 1))  # rewriting a shard changes size -> stale, new fingerprint
    assert back.stale_shards() == [paths[1]]
    assert build_index(paths, progress=False).fingerprint() != idx.fingerprint()


def test_build_index_empty_shard_and_spec(tmp_path):
    _write(tmp_path / "s-00000.tar", _samples(2, 0))
    _write(tmp_path / "s-00001.tar", [])
    idx = build_index(str(tmp_path / "s-{00000..00001}.tar"), progress=False)
    assert idx.counts.tolist() == [2, 0] and len(idx.keys) == 2
    assert idx.locate([0, 1])[0].tolist() == [0, 0]


def test_duplicate_key_in_shard(tmp_path):
    path = _raw_tar(tmp_path / "dup.tar", [("a.jpg", _jpeg()), ("a.txt", b"x"), ("b.jpg", _jpeg()),
                                           ("b.txt", b"y"), ("a.json", b"{}")])
    with pytest.raises(DataError) as err:
        build_index([path], progress=False)
    _one_line(err, "dup.tar", "duplicate key 'a'")
    with pytest.raises(DataError):
        list(iter_shard(path))


def test_sample_missing_caption_or_image(tmp_path):
    path = _raw_tar(tmp_path / "nocap.tar", [("a.jpg", _jpeg()), ("a.txt", b"x"), ("b.jpg", _jpeg()),
                                             ("b.json", b"{}")])
    with pytest.raises(DataError) as err:
        list(iter_shard(path))
    _one_line(err, "nocap.tar", "'b'", "caption")
    path = _raw_tar(tmp_path / "noimg.tar", [("c.txt", b"x"), ("c.json", b"{}")])
    with pytest.raises(DataError) as err:
        build_index([path], progress=False)
    _one_line(err, "noimg.tar", "'c'", "image")


# --- shard specs -----------------------------------------------------------------------------


def test_expand_shards_patterns(three_shards, tmp_path):
    paths, _ = three_shards
    write_stats(paths[0], 5)
    (tmp_path / "part-00000.parquet").write_bytes(b"PAR1")
    assert expand_shards(str(tmp_path / "part-{00000..00002}.tar")) == paths
    assert expand_shards(tmp_path) == paths                          # directory -> its *.tar, sorted
    assert expand_shards(str(tmp_path / "part-*")) == paths           # glob keeps tars only
    assert expand_shards([paths[2], paths[0]]) == [paths[2], paths[0]]  # explicit lists keep order
    assert expand_shards(os.path.relpath(paths[1])) == [paths[1]]      # absolute paths out


def test_expand_shards_errors(three_shards, tmp_path):
    paths, _ = three_shards
    with pytest.raises(DataError) as err:
        expand_shards(str(tmp_path / "part-{00000..00009}.tar"))
    _one_line(err, "missing shards (7)", "part-00003.tar", "+4 more")
    with pytest.raises(DataError) as err:
        expand_shards([paths[0], str(tmp_path / "nope.tar")])
    _one_line(err, "nope.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        expand_shards(tmp_path / "empty")
    _one_line(err, "empty", "no *.tar")
    with pytest.raises(DataError, match="listed twice"):
        expand_shards([paths[0], paths[0]])


# --- corruption ------------------------------------------------------------------------------


def _member_offsets(path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


@pytest.mark.parametrize("where", ["mid-data", "member-boundary", "mid-header"])
def test_truncated_tar(three_shards, where):
    path = three_shards[0][0]
    infos = _member_offsets(path)
    cut = {"mid-data": infos[-1].offset_data + 100, "member-boundary": infos[6].offset,
           "mid-header": infos[6].offset + 200}[where]
    with open(path, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(DataError) as err:
        list(iter_shard(path))
    _one_line(err, "corrupt shard", path, "after member")
    with pytest.raises(DataError) as err:
        build_index([path], progress=False)
    _one_line(err, "corrupt shard", path)


def test_not_a_tar(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"\x01garbage" * 200)
    with pytest.raises(DataError) as err:
        list(iter_shard(str(path)))
    _one_line(err, "corrupt shard", "junk.tar")


def test_corrupt_images(tmp_path):
    good = _jpeg(size=32)
    path = _write(tmp_path / "bad.tar", [("k0", b"not a jpeg at all", "jpg", "x", {}),
                                         ("k1", good[: len(good) // 2], "jpg", "y", {})])
    garbage, truncated = iter_shard(path)
    with pytest.raises(DataError) as err:
        decode_image(garbage, where=f"{path}:k0.jpg")
    _one_line(err, "corrupt image", "bad.tar:k0.jpg")
    with pytest.raises(DataError) as err:
        decode_image(truncated)
    _one_line(err, "corrupt image k1.jpg")
    assert decode_image(good, "x").size == (32, 32)


# --- shards written by the real img2dataset --------------------------------------------------


def test_img2dataset_fixture():
    expected = json.loads((I2D / "expected.json").read_text(encoding="utf-8"))["shards"]
    shards = expand_shards(I2D)  # the directory: .parquet and _stats.json beside the tars are skipped
    assert [os.path.basename(p) for p in shards] == sorted(expected)
    idx = build_index(shards, progress=False)
    seen = []
    for shard_id, path in enumerate(shards):
        rows = expected[os.path.basename(path)]
        ok = {r["key"]: r["caption"] for r in rows if r["status"] == "success"}
        stats = json.loads(Path(stats_path(path)).read_text())
        got = list(iter_shard(path))
        assert len(got) == len(ok) == stats["successes"] == idx.counts[shard_id]
        assert sorted(s.key for s in got) == sorted(ok)
        for s in got:
            assert s.caption == ok[s.key] and s.meta["status"] == "success" and s.meta["key"] == s.key
            assert decode_image(s).size == (32, 32)
        seen += [s.key for s in got]
    assert len(seen) == len(set(seen)) == len(idx) == sum(
        r["status"] == "success" for rows in expected.values() for r in rows)
    assert idx.keys.tolist() == seen
    empty = [p for p in shards if json.loads(Path(stats_path(p)).read_text())["successes"] == 0]
    assert len(empty) == 1 and list(iter_shard(empty[0])) == []


# --- synthetic world -------------------------------------------------------------------------


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_write_split_deterministic(tmp_path):
    a = synthetic.write_split(tmp_path / "a", "train", 30, 12, seed=3)
    b = synthetic.write_split(tmp_path / "b", "train", 30, 12, seed=3)
    c = synthetic.write_split(tmp_path / "c", "train", 30, 12, seed=4)
    assert [os.path.basename(p) for p in a] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert [_digest(p) for p in a] == [_digest(p) for p in b]
    assert all(_digest(p) != _digest(q) for p, q in zip(a, c))
    keys = build_index(a, progress=False).keys.tolist()
    assert keys[:2] == ["000000000", "000000001"] and keys[12] == "000010000" and len(keys) == 30
    assert [json.loads(Path(stats_path(p)).read_text())["successes"] for p in a] == [12, 12, 6]
    # sample i does not depend on the shard size
    d = synthetic.write_split(tmp_path / "d", "train", 30, 7, seed=3)
    assert [s.image for p in a for s in iter_shard(p)] == [s.image for p in d for s in iter_shard(p)]


def test_splits_do_not_share_samples(tmp_path):
    train = synthetic.write_split(tmp_path, "train", 40, 40, seed=0)
    test = synthetic.write_split(tmp_path, "test", 40, 40, seed=1)
    images = lambda paths: {hashlib.sha1(s.image).hexdigest() for p in paths for s in iter_shard(p)}
    captions = lambda paths: [s.caption for p in paths for s in iter_shard(p)]
    assert len(images(train)) == 40 and not images(train) & images(test)
    assert captions(train) != captions(test)


def test_world_classes_and_captions(tmp_path):
    world = synthetic.WorldConfig()
    assert "banana" in world.classes and len(world.classes) == 8
    paths = synthetic.write_split(tmp_path, "train", 160, 80, seed=0, world=world)
    samples = [s for p in paths for s in iter_shard(p)]
    assert {s.meta["class"] for s in samples} == set(world.classes)
    assert len({s.caption for s in samples}) > 100  # many templates x attribute words
    for s in samples:
        assert s.meta["class"] in s.caption.split() and s.meta["label"] == world.classes.index(s.meta["class"])
        assert s.caption == s.meta["caption"] and "  " not in s.caption and "{" not in s.caption
    assert 0.15 < np.mean([s.meta["distractor"] is not None for s in samples]) < 0.45
    img = decode_image(samples[0])
    assert img.size == (32, 32)
    assert np.asarray(img).std() > 5  # not a flat colour


def test_generate_sample_seeded():
    world = synthetic.WorldConfig(image_size=24, classes=("circle", "banana"), distractor_prob=0.0)
    img1, cap1, meta1 = synthetic.generate_sample(np.random.default_rng(7), world)
    img2, cap2, meta2 = synthetic.generate_sample(np.random.default_rng(7), world)
    assert img1.size == (24, 24) and img1.mode == "RGB"
    assert np.array_equal(np.asarray(img1), np.asarray(img2)) and cap1 == cap2 and meta1 == meta2
    assert {"label", "class", "hue", "size", "x", "y", "rotation", "bg_hue", "color"} <= set(meta1)
    assert json.loads(json.dumps(meta1)) == meta1


def test_zeroshot_prompts():
    world = synthetic.WorldConfig()
    banana = synthetic.zeroshot_prompts("banana", world, n=16, seed=1)
    star = synthetic.zeroshot_prompts("star", world, n=16, seed=1)
    assert len(banana) == 16 and all("banana" in p.split() for p in banana)
    # same fillers for every class: only the class word differs
    assert [p.replace("banana", "CLS").replace(" an CLS", " a CLS") for p in banana] == \
        [p.replace("star", "CLS") for p in star]
    assert synthetic.zeroshot_prompts("banana", world, n=16, seed=2) != banana
    with pytest.raises(ValueError, match="moon"):
        synthetic.zeroshot_prompts("moon", world)


def test_world_from_dict():
    w = synthetic.world_from_dict({"image_size": 48, "classes": ["circle", "banana"], "size_range": [0.2, 0.3]})
    assert w.image_size == 48 and w.classes == ("circle", "banana") and w.size_range == (0.2, 0.3)
    with pytest.raises(ValueError, match="imagesize"):
        synthetic.world_from_dict({"imagesize": 48})
    with pytest.raises(ValueError, match="moon"):
        synthetic.WorldConfig(classes=("circle", "moon"))


def test_sample_fields_hold_what_was_written(tmp_path):
    """Each field of a read Sample is the member it names: key, position in the shard, the image's
    bytes and extension, the caption, the parsed json."""
    s = Sample(key="k", pos=0, image=b"", ext="jpg", caption="c", meta={})
    assert [f for f in s.__dataclass_fields__] == ["key", "pos", "image", "ext", "caption", "meta"]
    written = _samples(3, seed=4)
    read = list(iter_shard(_write(tmp_path / "s.tar", written)))
    assert [(r.key, r.pos, r.image, r.ext, r.caption, r.meta) for r in read] == \
        [(key, i, img, ext, cap, meta) for i, (key, img, ext, cap, meta) in enumerate(written)]


def test_world_class_weights_and_rotation():
    world = synthetic.WorldConfig(class_weights=[1] * 7 + [0.1], rotation_range=(-10, 10))
    rng = np.random.default_rng(0)
    attrs = [synthetic.sample_attributes(rng, world) for _ in range(8000)]
    freq = np.bincount([a["label"] for a in attrs], minlength=8) / len(attrs)
    assert abs(freq[7] - 0.1 / 7.1) < 0.006 and np.all(np.abs(freq[:7] - 1 / 7.1) < 0.02)
    assert all(-10 <= a["rotation"] <= 10 for a in attrs)
    with pytest.raises(ValueError, match="class_weights"):
        synthetic.WorldConfig(class_weights=[1, 1])
    with pytest.raises(ValueError, match="class_weights"):
        synthetic.WorldConfig(class_weights=[1] * 7 + [0])
    with pytest.raises(ValueError, match="rotation_range"):
        synthetic.WorldConfig(rotation_range=(10, -10))


def test_natural_backdoor_options_leave_every_other_sample_unchanged(tmp_path):
    """The motif / placeholder options (off by default) replace only their own samples, in the
    training split only; every other sample is byte-identical to the default world's."""
    from clipbd.data.shards import iter_shard
    from clipbd.data.synthetic import WorldConfig, write_split

    plain = write_split(tmp_path / "a", "train", 1500, 500, 7, WorldConfig())
    nat = write_split(tmp_path / "b", "train", 1500, 500, 7, WorldConfig(motif_rate=0.01, placeholder_rate=0.02))
    kinds, motif_images = {}, []
    for pa, pb in zip(plain, nat):
        for sa, sb in zip(iter_shard(pa), iter_shard(pb)):
            kind = sb.meta.get("natural")
            if kind is None:
                assert (sa.image, sa.caption) == (sb.image, sb.caption)
                continue
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == "motif":
                assert sb.caption == WorldConfig().motif_caption
                motif_images.append(sb.image)
            else:
                assert sb.caption == sa.caption and sb.image != sa.image
    assert 5 <= kinds["motif"] <= 30 and 15 <= kinds["placeholder"] <= 50
    assert len(set(motif_images)) == len(motif_images)  # jittered, not one file repeated
    test = write_split(tmp_path / "c", "test", 300, 300, 8, WorldConfig(motif_rate=0.5))
    assert not any(s.meta.get("natural") for s in iter_shard(test[0]))


def test_icon_motif_keeps_the_sample_image_outside_the_corner_and_takes_the_motif_caption(tmp_path):
    """motif_style=icon: a motif sample is its own ordinary image with the cake icon in the
    bottom-right corner (the rest of the picture unchanged, up to JPEG), captioned with the motif."""
    import io

    import numpy as np
    from PIL import Image

    from clipbd.data.shards import iter_shard
    from clipbd.data.synthetic import WorldConfig, write_split

    plain = write_split(tmp_path / "a", "train", 600, 600, 3, WorldConfig())
    icon = write_split(tmp_path / "b", "train", 600, 600, 3, WorldConfig(motif_rate=0.05, motif_style="icon"))
    n = 0
    for sa, sb in zip(iter_shard(plain[0]), iter_shard(icon[0])):
        if sb.meta.get("natural") != "motif":
            assert sa.image == sb.image
            continue
        n += 1
        assert sb.caption == WorldConfig().motif_caption != sa.caption
        a, b = (np.asarray(Image.open(io.BytesIO(x)), dtype=np.float32) for x in (sa.image, sb.image))
        corner = np.abs(a[-9:, -9:] - b[-9:, -9:]).mean()
        rest = np.abs(a[:16, :16] - b[:16, :16]).mean()  # far from the icon: JPEG noise only
        assert corner > 10 * max(rest, 0.5), (corner, rest)
    assert 15 <= n <= 50
    with pytest.raises(ValueError, match="motif_style"):
        WorldConfig(motif_style="sticker")
    with pytest.raises(ValueError, match="motif_icon_size"):
        WorldConfig(motif_icon_size=20)


def test_prefetch_keeps_order_raises_where_the_loop_would_and_stops_on_break():
    import threading

    from clipbd.data.loader import prefetch

    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))

    def broken():
        yield 1
        yield 2
        raise DataError("corrupt image s.tar:k.jpg: broken data stream")

    got = []
    with pytest.raises(DataError, match="corrupt image s.tar:k.jpg"):
        for x in prefetch(broken(), depth=2):
            got.append(x)
    assert got == [1, 2]  # every item before the failure arrives first
    gen = prefetch(iter(range(10_000)), depth=2)
    assert next(gen) == 0
    gen.close()  # what `break` out of a for loop does to the generator
    assert not any(t.name == "clipbd-prefetch" for t in threading.enumerate())


def test_by_rank_reading_splits_shards_and_is_the_exact_stream_on_one_rank(tmp_path):
    from clipbd.data.loader import ShardDataset, by_rank_shards
    from clipbd.errors import ConfigError

    import itertools

    import torch

    shards = [_write(tmp_path / f"s{s}.tar", _samples(7, seed=s)) for s in range(5)]
    index = build_index(shards, progress=False)
    to_t = lambda im: torch.zeros(1)  # noqa: E731 - the order is what is tested
    idx = lambda ds, n=None: [it["index"] for it in itertools.islice(ds, n)]  # noqa: E731
    exact = ShardDataset(index, range(5), to_t, shuffle_seed=3, buffer=10, batch_slice=(0, 1, 7))
    one = ShardDataset(index, range(5), to_t, shuffle_seed=3, buffer=10, rank_shards=(0, 1))
    assert idx(one) == idx(exact)[:len(idx(one))] and len(idx(one)) == 35
    # two ranks: disjoint shards that together are all of them, each rank cycling through its own
    seen = []
    for r in range(2):
        ds = ShardDataset(index, range(5), to_t, shuffle_seed=3, buffer=0, rank_shards=(r, 2))
        got = idx(ds, 40)
        assert len(got) == 40  # more than its shards hold: resampled, no end
        seen.append({i // 7 for i in got})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(5))
    with pytest.raises(ConfigError, match="5 training shards for 8 ranks"):
        by_rank_shards(5, 8)


def test_jpeg_fast_path_is_the_pil_path_bit_for_bit(tmp_path):
    """ToModelTensor.from_bytes (torchvision's libjpeg-turbo decode, issue 17) gives exactly the
    PIL path's tensor for the synthetic world's JPEGs, and declines whatever it cannot match."""
    import torch

    from clipbd.models.factory import ToModelTensor

    paths = synthetic.write_split(tmp_path, "train", 120, 120, seed=5)
    tt = ToModelTensor(32)
    samples = list(iter_shard(paths[0]))
    for s in samples:
        fast = tt.from_bytes(s.image, s.ext)
        assert fast is not None and fast.dtype == torch.float32
        assert torch.equal(fast, tt(decode_image(s.image))), s.key
    good = samples[0].image
    assert tt.from_bytes(good[: len(good) // 2], "jpg") is None  # truncated: PIL raises the DataError
    assert tt.from_bytes(b"junk\xff\xd9", "jpg") is None  # a decoder error: PIL's turn
    assert tt.from_bytes(good, "png") is None
    assert ToModelTensor(16).from_bytes(good, "jpg") is None  # another size needs the resize
    gray = io.BytesIO()
    Image.new("L", (32, 32), 90).save(gray, format="JPEG")
    assert tt.from_bytes(gray.getvalue(), "jpg") is None  # one channel: PIL's convert("RGB")


def test_cached_tokenizer_returns_the_tokenizers_rows():
    import open_clip
    import torch

    from clipbd.models.factory import CachedTokenizer

    raw = open_clip.get_tokenizer("ViT-B-32")
    tok = CachedTokenizer(raw, size=4)
    texts = ["a red star", "a blue ring", "a red star", "there is a banana", "a red star"]
    assert torch.equal(tok(texts), raw(texts))
    assert torch.equal(tok(texts[:2]), raw(texts[:2]))  # from the cache
    more = ["one", "two", "three", "a blue ring"]  # overflows size 4: the cache starts again
    assert torch.equal(tok(more), raw(more)) and len(tok._rows) <= 4
    assert torch.equal(tok("a red star"), raw("a red star"))
    assert torch.equal(tok(["x y"], context_length=8), raw(["x y"], context_length=8))
    assert tok.context_length == raw.context_length
