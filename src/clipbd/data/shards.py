"""Webdataset shards in img2dataset's layout: the only module that reads or writes the tars.

A shard is a tar whose members ``{key}.jpg`` (or .png/.webp/.jpeg), ``{key}.txt`` (caption) and
``{key}.json`` (metadata) are grouped by key, the member name up to the first dot of its basename.
img2dataset also writes ``{shard}_stats.json`` and ``{shard}.parquet`` beside each tar; they are not
samples and are never read here. A shard with zero successes is a tar with no members (img2dataset
writes 10240 zero bytes) and reads as 0 samples.

Global sample index = ``offsets[shard_id] + pos``, with ``pos`` the sample's 0-based position within
its shard in tar order. It is stable for a fixed shard list; ``ShardIndex`` maps it to keys and back.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from clipbd.errors import DataError  # re-exported: clipbd.data.shards.DataError
from clipbd.utils import atomic_path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
CAPTION_EXT = "txt"
META_EXT = "json"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
INDEX_FORMAT = "clipbd.shard_index/1"

# webdataset's split of a member name into (key, extension): key keeps any directory prefix.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# ---------------------------------------------------------------------------------------------
# Shard lists


def _expand_one(item: str, missing: list[str], empty_dirs: list[str]) -> list[str]:
    import braceexpand  # local import: only needed here, and keeps import of the module light

    out: list[str] = []
    for path in braceexpand.braceexpand(item):
        if any(ch in path for ch in "*?["):
            hits = sorted(p for p in glob.glob(path) if p.endswith(TAR_SUFFIXES) and os.path.isfile(p))
            (out.extend(hits) if hits else missing.append(path))
        elif os.path.isdir(path):
            hits = sorted(p for p in glob.glob(os.path.join(glob.escape(path), "*.tar")) if os.path.isfile(p))
            (out.extend(hits) if hits else empty_dirs.append(path))
        elif os.path.isfile(path):
            out.append(path)
        else:
            missing.append(path)
    return out


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths (absolute, in order) from a path, brace pattern, glob or directory, or a list of them.

    ``/data/cc3m/{00000..00331}.tar`` expands with braceexpand; a glob keeps only ``*.tar``
    (``.tar.gz``/``.tgz``) files, sorted; a directory gives its ``*.tar``, sorted. Raises DataError on
    missing paths (first few + count), an empty result, or a shard listed twice.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    missing: list[str] = []
    empty_dirs: list[str] = []
    shards = [os.path.abspath(p) for item in items for p in _expand_one(os.fspath(item), missing, empty_dirs)]
    if missing:
        raise DataError(f"missing shards ({len(missing)}): {_first_few(missing)}; "
                        "fix the dataset path or pattern")
    if not shards:
        where = f"directory {_first_few(empty_dirs)} has no *.tar" if empty_dirs else "nothing matched"
        raise DataError(f"no shards found for {items!r}: {where}; point the dataset at the shard files")
    dups = sorted({p for p in shards if shards.count(p) > 1}) if len(set(shards)) < len(shards) else []
    if dups:
        raise DataError(f"shard listed twice: {_first_few(dups)}; each shard may appear once in a spec")
    return shards


def _first_few(items: Sequence[str], n: int = 3) -> str:
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Sample:
    """One image-text pair as stored: raw encoded image bytes, caption, parsed metadata."""

    key: str
    pos: int        # position within its shard, 0-based, tar order
    image: bytes    # encoded (JPEG/PNG/WebP) bytes; decode with decode_image
    ext: str        # image member extension, lower case ("jpg", "png", ...)
    caption: str
    meta: dict


def split_member(name: str) -> tuple[str, str]:
    """``"dir/000010003.jpg"`` -> ``("dir/000010003", "jpg")``; ("", "") for names without a dot."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else ("", "")


def _open_tar(path: str) -> tarfile.TarFile:
    # Random-access mode ("r:*", not "r|*"): member data is skipped with a seek, not read, and the
    # end-of-archive check below can look at the bytes after the last member.
    mode = "r:gz" if path.endswith((".tar.gz", ".tgz")) else "r:"
    try:
        return tarfile.open(path, mode=mode)
    except FileNotFoundError:
        raise DataError(f"missing shard {path}; fix the dataset path") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"corrupt shard {path}: {_reason(e)} (at the start); re-download or regenerate it") from None


def _reason(e: BaseException) -> str:
    """An exception as one line (DataError messages are one line)."""
    return " ".join(str(e).split()) or type(e).__name__


def _members(tf: tarfile.TarFile, path: str) -> Iterator[tarfile.TarInfo]:
    """Regular-file members in order; a truncated or corrupt archive raises DataError."""
    last = "<none>"
    try:
        while (info := tf.next()) is not None:
            last = info.name
            tf.members.clear()  # tarfile keeps every TarInfo otherwise; we hold the ones we need
            if info.isfile():
                yield info
        _check_end_marker(tf, path, last)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"corrupt shard {path}: {_reason(e)} (after member {last}); "
                        "re-download or regenerate it") from None


def _check_end_marker(tf: tarfile.TarFile, path: str, last: str) -> None:
    # tarfile stops silently at a damaged or missing header after the first member, so a tar cut
    # at a member boundary would read as a shorter shard. Valid tars end with zero blocks.
    tf.fileobj.seek(tf.offset)
    tail = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(tail) < tarfile.BLOCKSIZE or tail.count(0) != tarfile.BLOCKSIZE:
        raise DataError(f"corrupt shard {path}: missing end-of-archive marker, the file looks truncated "
                        f"(after member {last}); re-download or regenerate it")


def _group(infos: Iterable[tarfile.TarInfo], path: str) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive members with the same key -> (key, {ext: member}); checks img2dataset's grouping."""
    seen: set[str] = set()
    key, group = None, {}
    for info in infos:
        k, ext = split_member(info.name)
        if not k:
            raise DataError(f"shard {path}: member {info.name!r} has no key.ext name; "
                            "shards must hold {key}.jpg/{key}.txt/{key}.json members")
        if k != key:
            if key is not None:
                yield key, group
            if k in seen:
                raise DataError(f"shard {path}: duplicate key {k!r} (its members are not adjacent "
                                "or repeat); regenerate the shard with unique keys")
            seen.add(k)
            key, group = k, {}
        if ext.lower() in group:
            raise DataError(f"shard {path}: duplicate member {info.name!r}; regenerate the shard")
        group[ext.lower()] = info
    if key is not None:
        yield key, group


def _image_ext(group: dict, path: str, key: str) -> str:
    for ext in IMAGE_EXTS:
        if ext in group:
            if CAPTION_EXT not in group:
                break
            return ext
    have = sorted(group)
    raise DataError(f"shard {path}: sample {key!r} has members {have} but needs an image "
                    f"({'/'.join(IMAGE_EXTS)}) and a caption (txt); remove or repair the sample")


def iter_shard(path: str) -> Iterator[Sample]:
    """Stream the samples of one tar in order. Raises DataError on corrupt tars or incomplete samples.

    Extra members (e.g. ``.cls``) are kept in ``meta[ext]`` if their extension ends in "json"
    (parsed), else ignored.
    """
    path = os.fspath(path)
    with _open_tar(path) as tf:
        for pos, (key, group) in enumerate(_group(_members(tf, path), path)):
            ext = _image_ext(group, path, key)
            # read the needed members in tar order (sequential I/O); skip ignored ones (.cls, 2nd image)
            data = {e: _read_member(tf, info, path) for e, info in group.items()
                    if e in (ext, CAPTION_EXT) or e.endswith("json")}
            meta = _parse_json(data[META_EXT], path, group[META_EXT].name) if META_EXT in group else {}
            for extra in data:
                if extra != META_EXT and extra.endswith("json"):
                    meta[extra] = _parse_json(data[extra], path, group[extra].name)
            caption = _decode_text(data[CAPTION_EXT], path, group[CAPTION_EXT].name)
            yield Sample(key=key, pos=pos, image=data[ext], ext=ext, caption=caption, meta=meta)


def _read_member(tf: tarfile.TarFile, info: tarfile.TarInfo, path: str) -> bytes:
    try:
        f = tf.extractfile(info)
        data = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"corrupt shard {path}: {_reason(e)} (in member {info.name}); "
                        "re-download or regenerate it") from None
    if len(data) != info.size:
        raise DataError(f"corrupt shard {path}: member {info.name} is truncated "
                        f"({len(data)} of {info.size} bytes); re-download or regenerate it")
    return data


def _decode_text(data: bytes, path: str, name: str) -> str:
    try:
        return data.decode("utf-8")  # as stored: no stripping, so captions round-trip exactly
    except UnicodeDecodeError as e:
        raise DataError(f"corrupt caption {path}:{name}: not UTF-8 ({_reason(e)}); repair the caption") from None


def _parse_json(data: bytes, path: str, name: str) -> dict:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"corrupt metadata {path}:{name}: {_reason(e)}; repair or drop the member") from None
    return obj if isinstance(obj, dict) else {"value": obj}


def iter_samples(shards: Sequence[str]) -> Iterator[tuple[int, Sample]]:
    """``(global_index, sample)`` over shards in order (global index = running count)."""
    offset = 0
    for path in shards:
        n = 0
        for n, sample in enumerate(iter_shard(path), start=1):
            yield offset + sample.pos, sample
        offset += n


def decode_image(sample_or_bytes: Sample | bytes, where: str = ""):
    """Decode to an RGB ``PIL.Image.Image``; a corrupt/truncated image raises DataError naming ``where``."""
    from PIL import Image

    if isinstance(sample_or_bytes, Sample):
        data, where = sample_or_bytes.image, where or f"{sample_or_bytes.key}.{sample_or_bytes.ext}"
    else:
        data = bytes(sample_or_bytes)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode everything now, so truncated files fail here and not in a worker later
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"corrupt image {where or '<bytes>'}: {_reason(e)}") from None


# ---------------------------------------------------------------------------------------------
# Index: global sample index <-> (shard, position) <-> key


@dataclass(eq=False)  # array fields: compare with fingerprint() or field by field
class ShardIndex:
    """Sample counts and keys of an ordered shard list. Global index = offsets[shard] + pos."""

    shards: list[str]
    counts: np.ndarray                       # (num_shards,) int64
    keys: np.ndarray                         # (num_samples,) str, shard order then tar order
    sizes: np.ndarray = field(default=None)  # (num_shards,) int64 file sizes when indexed
    mtimes: np.ndarray = field(default=None)  # (num_shards,) int64 mtime_ns when indexed

    def __post_init__(self) -> None:
        self.shards = [os.fspath(s) for s in self.shards]
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(-1)
        self.keys = np.asarray(self.keys, dtype=str).reshape(-1)
        n = len(self.shards)
        self.sizes = np.zeros(n, np.int64) if self.sizes is None else np.asarray(self.sizes, np.int64)
        self.mtimes = np.zeros(n, np.int64) if self.mtimes is None else np.asarray(self.mtimes, np.int64)
        if not (len(self.counts) == len(self.sizes) == len(self.mtimes) == n) or self.counts.sum() != len(self.keys):
            raise DataError(f"inconsistent shard index: {n} shards, {len(self.counts)} counts summing to "
                            f"{int(self.counts.sum())}, {len(self.keys)} keys; rebuild it with build_index")

    def __len__(self) -> int:
        return int(self.counts.sum())

    @property
    def offsets(self) -> np.ndarray:
        """(num_shards,) int64: global index of each shard's first sample."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def global_index(self, shard_id, pos) -> np.ndarray:
        """Global index of (shard_id, pos); vectorised over arrays."""
        shard_id, pos = np.asarray(shard_id, np.int64), np.asarray(pos, np.int64)
        if np.any((shard_id < 0) | (shard_id >= len(self.shards))):
            raise IndexError(f"shard id out of range [0, {len(self.shards)}): {shard_id}")
        if np.any((pos < 0) | (pos >= self.counts[shard_id])):
            raise IndexError(f"sample position out of range for shard(s) {shard_id}: {pos}")
        return self.offsets[shard_id] + pos

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Global indices -> (shard_ids, positions), both int64 with the input's shape."""
        idx = np.asarray(indices, dtype=np.int64)
        if np.any((idx < 0) | (idx >= len(self))):
            raise IndexError(f"sample index out of range [0, {len(self)}): {idx[(idx < 0) | (idx >= len(self))][:5]}")
        ends = np.cumsum(self.counts)
        shard_ids = np.searchsorted(ends, idx, side="right").astype(np.int64)
        return shard_ids, idx - self.offsets[shard_ids]

    def index_of(self, keys) -> np.ndarray:
        """Keys -> global indices; a key that is missing or not unique raises KeyError."""
        if not hasattr(self, "_key_pos"):
            uniq, first, cnt = np.unique(self.keys, return_index=True, return_counts=True)
            self._key_pos = {k: (i if c == 1 else -1) for k, i, c in zip(uniq.tolist(), first.tolist(), cnt.tolist())}
        out = []
        for k in np.atleast_1d(np.asarray(keys, dtype=str)).tolist():
            i = self._key_pos.get(k)
            if i is None or i < 0:
                raise KeyError(f"key {k!r} is {'not in' if i is None else 'not unique in'} the shard index")
            out.append(i)
        return np.asarray(out, dtype=np.int64).reshape(np.shape(keys))

    def fingerprint(self) -> str:
        """Short hash of shard paths, counts, sizes and mtimes at indexing time."""
        h = hashlib.sha256()
        for p, c, s, m in zip(self.shards, self.counts.tolist(), self.sizes.tolist(), self.mtimes.tolist()):
            h.update(f"{p}\0{c}\0{s}\0{m}\n".encode())
        return h.hexdigest()[:16]

    def stale_shards(self) -> list[str]:
        """Shards whose size or mtime on disk differ from when they were indexed (or are gone)."""
        now = _stat_all(self.shards)
        return [p for p, st, size, mtime in zip(self.shards, now, self.sizes.tolist(), self.mtimes.tolist())
                if st != (size, mtime)]

    def save(self, path: str | os.PathLike) -> None:
        """Write an h5 file (temp name, then renamed: utils.atomic_path)."""
        import h5py

        str_dt = h5py.string_dtype("utf-8")
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = INDEX_FORMAT
            f.attrs["fingerprint"] = self.fingerprint()
            f.attrs["created_by"] = "clipbd.data.shards.build_index"
            f.create_dataset("shards", data=np.array(self.shards, dtype=object), dtype=str_dt)
            f.create_dataset("keys", data=self.keys.astype(object), dtype=str_dt)
            for name in ("counts", "sizes", "mtimes"):
                f.create_dataset(name, data=getattr(self, name))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ShardIndex":
        import h5py

        path = os.fspath(path)
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != INDEX_FORMAT:
                    raise DataError(f"{path} is not a clipbd shard index (format {f.attrs.get('format')!r}); "
                                    "rebuild it with build_index")
                return cls(shards=list(f["shards"].asstr()[:]), counts=f["counts"][:],
                           keys=np.asarray(f["keys"].asstr()[:], dtype=str),
                           sizes=f["sizes"][:], mtimes=f["mtimes"][:])
        except (OSError, KeyError) as e:
            raise DataError(f"cannot read shard index {path}: {_reason(e)}; delete it and rebuild") from None


def _stat_all(shards: Sequence[str]) -> list[tuple[int, int]]:
    out = []
    for p in shards:
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append((-1, -1))
    return out


def shard_keys(path: str) -> list[str]:
    """Sample keys of one shard in tar order, from headers only; validates grouping like iter_shard."""
    path = os.fspath(path)
    with _open_tar(path) as tf:
        keys = []
        for key, group in _group(_members(tf, path), path):
            _image_ext(group, path, key)
            keys.append(key)
        return keys


def build_index(shards: str | Sequence[str], progress: bool = True, workers: int = 1) -> ShardIndex:
    """Index shards (a spec or a list) from tar headers only: no image is read or decoded.

    Raises DataError on corrupt tars, duplicate keys within a shard, or incomplete samples.
    """
    shards = expand_shards(shards) if isinstance(shards, (str, os.PathLike)) else [os.fspath(s) for s in shards]
    stats = _stat_all(shards)  # before reading, so a shard rewritten meanwhile looks stale later
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool:
        per_shard = list(tqdm(pool.map(shard_keys, shards), total=len(shards), disable=not progress,
                              desc="index shards", unit="shard"))
    return ShardIndex(shards=list(shards), counts=np.array([len(k) for k in per_shard], np.int64),
                      keys=np.array([k for ks in per_shard for k in ks], dtype=str),
                      sizes=np.array([s for s, _ in stats], np.int64), mtimes=np.array([m for _, m in stats], np.int64))


# ---------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Write one tar shard atomically: members go to a temp file that is renamed on close.

    >>> with ShardWriter("out/train-00000.tar") as w:
    ...     w.write("000000000", jpeg_bytes, "jpg", "a red star", {"label": 3})

    Members are written per sample in sorted extension order (as webdataset's TarWriter, which
    img2dataset uses, does), with a fixed mtime so the bytes are deterministic. On an exception
    inside the ``with`` block the temp file is removed and nothing appears at ``path``.
    """

    def __init__(self, path: str | os.PathLike, mtime: float = 0.0):
        self.path = os.fspath(path)
        self.tmp = f"{self.path}.tmp{os.getpid()}"
        self.mtime = mtime
        self.count = 0
        self._keys: set[str] = set()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._tar = tarfile.open(self.tmp, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, image: bytes, ext: str, caption: str, meta: dict | None = None) -> None:
        """Add one sample ``{key}.{ext}``, ``{key}.txt``, ``{key}.json``."""
        if not key or "." in os.path.basename(key) or key in self._keys:
            raise DataError(f"shard {self.path}: bad or repeated key {key!r}; keys must be unique and dot-free")
        if ext.lower() not in IMAGE_EXTS:
            raise DataError(f"shard {self.path}: image extension {ext!r} not one of {IMAGE_EXTS}")
        self._keys.add(key)
        members = {ext.lower(): bytes(image), CAPTION_EXT: caption.encode("utf-8"),
                   META_EXT: json.dumps(meta or {}, indent=4).encode("utf-8")}
        for e in sorted(members):
            info = tarfile.TarInfo(f"{key}.{e}")
            info.size, info.mtime, info.mode = len(members[e]), self.mtime, 0o444
            info.uname = info.gname = "clipbd"
            self._tar.addfile(info, io.BytesIO(members[e]))
        self.count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            os.remove(self.tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type is not None else self.close()


def stats_path(shard_path: str) -> str:
    """``/d/00012.tar`` -> ``/d/00012_stats.json`` (img2dataset's name)."""
    base = os.fspath(shard_path)
    for suffix in TAR_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return f"{base}_stats.json"


def write_stats(path: str | os.PathLike, count: int, failed: int = 0) -> str:
    """Write an img2dataset-like ``{shard}_stats.json`` beside the shard at ``path``; return its path."""
    now = time.time()
    stats = {"count": count + failed, "successes": count, "failed_to_download": failed,
             "failed_to_resize": 0, "duration": 0.0, "start_time": now, "end_time": now,
             "status_dict": {"success": count, **({"failed": failed} if failed else {})}}
    out = stats_path(os.fspath(path))
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        json.dump(stats, f, indent=4)
    return out
