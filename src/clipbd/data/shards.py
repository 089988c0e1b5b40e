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
import filecmp
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
INDEX_FORMAT = "clipbd.shard_index/2"  # /2 adds positions, members, skipped
_READ_FORMATS = ("clipbd.shard_index/1", INDEX_FORMAT)

# webdataset's split of a member name into (key, extension): key keeps any directory prefix.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# Why a sample (or a whole shard) can be skipped under data.on_error=skip; docs/data.md.
SKIP_REASONS = ("empty_shard", "corrupt_shard", "truncated_shard", "bad_member", "missing_member",
                "duplicate_member", "duplicate_key", "bad_caption", "bad_metadata", "corrupt_image")


@dataclass(frozen=True)
class Skipped:
    """One sample (or shard) left out of the index, and why: a row of `skipped.csv`."""

    shard: str
    member: str   # the sample's key, or the tar member where the shard broke off ("" = whole shard)
    reason: str   # one of SKIP_REASONS
    message: str  # the one-line error data.on_error=raise would have raised


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


class _PlainMember:
    """A regular file member of a plain ustar archive: what the readers use of a TarInfo."""

    __slots__ = ("name", "size", "offset_data")

    def __init__(self, name: str, size: int, offset_data: int):
        self.name, self.size, self.offset_data = name, size, offset_data

    @staticmethod
    def isfile() -> bool:
        return True


class _PlainTar:
    """An uncompressed tar whose headers are all plain ustar/GNU file or directory headers with
    valid checksums, followed by a zero end block (every shard clipbd, img2dataset and webdataset
    write): its members come from one scan of the 512-byte headers (a seek past each member's data,
    no TarInfo objects), read by offset. Anything else — pax or GNU long-name headers, links, a bad
    checksum, a truncated member or a missing end marker — is left to `tarfile` (`_plain_scan`
    returns None), so every corrupt shard fails with the same error as before."""

    def __init__(self, fh, members: list[_PlainMember]):
        self.fh, self.members_ = fh, members

    def extractfile(self, info: _PlainMember) -> io.BytesIO:
        self.fh.seek(info.offset_data)
        return io.BytesIO(self.fh.read(info.size))

    def __enter__(self) -> "_PlainTar":
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    def close(self) -> None:
        self.fh.close()


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def _plain_scan(fh, file_size: int) -> list[_PlainMember] | None:
    """The regular-file members of an uncompressed tar if it is plain (see _PlainTar), else None."""
    members, offset = [], 0
    while True:
        fh.seek(offset)
        hdr = fh.read(_BLOCK)
        if len(hdr) < _BLOCK:
            return None  # no end marker: tarfile says how the file is truncated
        if hdr == _ZERO_BLOCK:
            return members if offset > 0 or file_size >= _BLOCK else None
        kind = hdr[156:157]
        if kind not in (b"0", b"\0", b"5") or hdr[124] & 0x80:  # pax/GNU/link headers, base-256 sizes
            return None
        try:
            size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            chksum = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") if hdr[257:263] == b"ustar\x00" else ""
        except (ValueError, UnicodeDecodeError):
            return None
        unsigned = 256 + sum(hdr[:148]) + sum(hdr[156:])
        if chksum != unsigned:
            return None  # (tarfile also accepts the signed sum: leave those rare files to it)
        if prefix:
            name = f"{prefix}/{name}"
        data_at = offset + _BLOCK
        if data_at + size > file_size:
            return None
        if kind != b"5" and not (kind == b"\0" and name.endswith("/")):
            members.append(_PlainMember(name, size, data_at))
        offset = data_at + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _open_tar(path: str) -> tarfile.TarFile | _PlainTar:
    # Random-access mode ("r:*", not "r|*"): member data is skipped with a seek, not read, and the
    # end-of-archive check below can look at the bytes after the last member.
    mode = "r:gz" if path.endswith((".tar.gz", ".tgz")) else "r:"
    try:
        size = os.path.getsize(path)
        if size == 0:  # an interrupted copy or download; not img2dataset's empty tar
            raise DataError(f"empty shard {path}: 0 bytes, not a tar; re-download or regenerate it, or "
                            "drop it from dataset.shards", reason="empty_shard")
        if mode == "r:":
            fh = open(path, "rb")
            members = _plain_scan(fh, size)
            if members is not None:
                return _PlainTar(fh, members)
            fh.close()
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
    if isinstance(tf, _PlainTar):  # scanned and checked when opened
        yield from tf.members_
        return
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
                        "re-download or regenerate it", reason="truncated_shard", member=last) from None


def _check_end_marker(tf: tarfile.TarFile, path: str, last: str) -> None:
    # tarfile stops silently at a damaged or missing header after the first member, so a tar cut
    # at a member boundary would read as a shorter shard. Valid tars end with zero blocks.
    tf.fileobj.seek(tf.offset)
    tail = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(tail) < tarfile.BLOCKSIZE or tail.count(0) != tarfile.BLOCKSIZE:
        raise DataError(f"corrupt shard {path}: missing end-of-archive marker, the file looks truncated "
                        f"(after member {last}); re-download or regenerate it", reason="truncated_shard", member=last)


Group = tuple[str, dict[str, tarfile.TarInfo], "DataError | None"]


def _group(infos: Iterable[tarfile.TarInfo], path: str, strict: bool = True) -> Iterator[Group]:
    """Consecutive members with the same key -> (key, {ext: member}, problem); checks img2dataset's
    grouping. strict: a problem raises at once; else it rides along with its group (a member
    without a key.ext name becomes a group of its own), for data.on_error=skip to leave out. The
    groups' order — their ordinal is a sample's raw position in the shard — is the same either way."""
    def flag(err: DataError, group_problem=None):
        if strict:
            raise err
        return group_problem or err

    seen: set[str] = set()
    key, group, problem = None, {}, None
    for info in infos:
        k, ext = split_member(info.name)
        if not k:
            yield info.name, {}, flag(DataError(
                f"shard {path}: member {info.name!r} has no key.ext name; shards must hold "
                "{key}.jpg/{key}.txt/{key}.json members", reason="bad_member", member=info.name))
            continue
        if k != key:
            if key is not None:
                yield key, group, problem
            key, group, problem = k, {}, None
            if k in seen:
                problem = flag(DataError(f"shard {path}: duplicate key {k!r} (its members are not adjacent "
                                         "or repeat); regenerate the shard with unique keys",
                                         reason="duplicate_key", member=k))
            seen.add(k)
        if ext.lower() in group:
            problem = flag(DataError(f"shard {path}: duplicate member {info.name!r}; regenerate the shard",
                                     reason="duplicate_member", member=k), problem)
            continue
        group[ext.lower()] = info
    if key is not None:
        yield key, group, problem


def _image_ext(group: dict, path: str, key: str) -> str:
    for ext in IMAGE_EXTS:
        if ext in group:
            if CAPTION_EXT not in group:
                break
            return ext
    have = sorted(group)
    raise DataError(f"shard {path}: sample {key!r} has members {have} but needs an image "
                    f"({'/'.join(IMAGE_EXTS)}) and a caption (txt); remove or repair the sample",
                    reason="missing_member", member=key)


def _read_sample(tf: tarfile.TarFile, path: str, key: str, group: dict, pos: int) -> Sample:
    """The members of one group -> Sample; raises DataError (naming the member) on a bad one.
    Extra members (e.g. ``.cls``) are kept in ``meta[ext]`` if their extension ends in "json"
    (parsed), else ignored."""
    ext = _image_ext(group, path, key)
    # read the needed members in tar order (sequential I/O); skip ignored ones (.cls, 2nd image)
    data = {e: _read_member(tf, info, path) for e, info in group.items()
            if e in (ext, CAPTION_EXT) or e.endswith("json")}
    meta = _parse_json(data[META_EXT], path, group[META_EXT].name) if META_EXT in group else {}
    for extra in data:
        if extra != META_EXT and extra.endswith("json"):
            meta[extra] = _parse_json(data[extra], path, group[extra].name)
    caption = _decode_text(data[CAPTION_EXT], path, group[CAPTION_EXT].name)
    return Sample(key=key, pos=pos, image=data[ext], ext=ext, caption=caption, meta=meta)


def iter_shard(path: str, positions: Sequence[int] | None = None) -> Iterator[Sample]:
    """Stream the samples of one tar in order. Raises DataError on corrupt tars or incomplete samples.

    positions: read only the samples at these raw positions (ascending ordinals of the member
    groups, what `ShardIndex.read` passes for a shard the index left samples out of); the others
    are passed over unread, reading stops after the last one (a shard truncated after it reads
    fine) and `Sample.pos` counts the samples read. None: every sample, each one must be sound.
    """
    path = os.fspath(path)
    if positions is None:
        with _open_tar(path) as tf:
            for pos, (key, group, _) in enumerate(_group(_members(tf, path), path)):
                yield _read_sample(tf, path, key, group, pos)
        return
    want = [int(p) for p in positions]
    if not want:
        return
    with _open_tar(path) as tf:
        j = 0
        for raw, (key, group, problem) in enumerate(_group(_members(tf, path), path, strict=False)):
            if raw == want[j]:
                if problem is not None:
                    raise problem
                yield _read_sample(tf, path, key, group, j)
                j += 1
                if j == len(want):
                    return
    raise DataError(f"shard {path}: {len(want) - j} indexed samples not found, the shard changed since it "
                    "was indexed; re-index it (force=[data])")


def _read_member(tf: tarfile.TarFile, info: tarfile.TarInfo, path: str) -> bytes:
    try:
        f = tf.extractfile(info)
        data = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"corrupt shard {path}: {_reason(e)} (in member {info.name}); "
                        "re-download or regenerate it", reason="truncated_shard", member=info.name) from None
    if len(data) != info.size:
        raise DataError(f"corrupt shard {path}: member {info.name} is truncated "
                        f"({len(data)} of {info.size} bytes); re-download or regenerate it",
                        reason="truncated_shard", member=info.name)
    return data


def _decode_text(data: bytes, path: str, name: str) -> str:
    try:
        return data.decode("utf-8")  # as stored: no stripping, so captions round-trip exactly
    except UnicodeDecodeError as e:
        raise DataError(f"corrupt caption {path}:{name}: not UTF-8 ({_reason(e)}); repair the caption",
                        reason="bad_caption", member=name) from None


def _parse_json(data: bytes, path: str, name: str) -> dict:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"corrupt metadata {path}:{name}: {_reason(e)}; repair or drop the member",
                        reason="bad_metadata", member=name) from None
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
            return im if im.mode == "RGB" else im.convert("RGB")  # convert("RGB") of RGB is a copy
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"corrupt image {where or '<bytes>'}: {_reason(e)}", reason="corrupt_image",
                        member=where) from None



# ---------------------------------------------------------------------------------------------
# Index: global sample index <-> (shard, position) <-> key


@dataclass(eq=False)  # array fields: compare with fingerprint() or field by field
class ShardIndex:
    """Sample counts and keys of an ordered shard list. Global index = offsets[shard] + pos.

    The index decides which samples exist: with data.on_error=skip, samples (or shards) that
    cannot be read are left out and listed in `skipped`, and `positions` keeps where each indexed
    sample sits in its tar, so every reader (`read`) sees exactly the indexed samples."""

    shards: list[str]
    counts: np.ndarray                       # (num_shards,) int64
    keys: np.ndarray                         # (num_samples,) str, shard order then tar order
    sizes: np.ndarray = field(default=None)  # (num_shards,) int64 file sizes when indexed
    mtimes: np.ndarray = field(default=None)  # (num_shards,) int64 mtime_ns when indexed
    positions: np.ndarray = field(default=None)  # (num_samples,) int64 raw member-group ordinal in its tar
    members: np.ndarray = field(default=None)  # (num_samples,) str image member name ("" if unknown)
    skipped: list = field(default_factory=list)  # [Skipped]: what the index left out

    def __post_init__(self) -> None:
        self.shards = [os.fspath(s) for s in self.shards]
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(-1)
        self.keys = np.asarray(self.keys, dtype=str).reshape(-1)
        n = len(self.shards)
        self.sizes = np.zeros(n, np.int64) if self.sizes is None else np.asarray(self.sizes, np.int64)
        self.mtimes = np.zeros(n, np.int64) if self.mtimes is None else np.asarray(self.mtimes, np.int64)
        m = len(self.keys)
        if self.positions is None:  # nothing left out: a sample's raw position is its position
            self.positions = np.arange(m, dtype=np.int64) - np.repeat(self.offsets_of(self.counts), self.counts)
        self.positions = np.asarray(self.positions, np.int64).reshape(-1)
        self.members = np.full(m, "") if self.members is None else np.asarray(self.members, dtype=str).reshape(-1)
        self.skipped = list(self.skipped)
        if (not (len(self.counts) == len(self.sizes) == len(self.mtimes) == n) or self.counts.sum() != m
                or len(self.positions) != m or len(self.members) != m):
            raise DataError(f"inconsistent shard index: {n} shards, {len(self.counts)} counts summing to "
                            f"{int(self.counts.sum())}, {m} keys; rebuild it with build_index")

    @staticmethod
    def offsets_of(counts: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else np.zeros(0, np.int64)

    def read(self, shard_id: int) -> Iterator[Sample]:
        """The indexed samples of shard `shard_id`, in order, `pos` = position among them (the
        global index is offsets[shard_id] + pos). Samples the index left out are never read."""
        path = self.shards[shard_id]
        if path not in self._gappy:
            return iter_shard(path)
        lo = int(self.offsets[shard_id])
        return iter_shard(path, positions=self.positions[lo:lo + int(self.counts[shard_id])].tolist())

    @property
    def _gappy(self) -> set[str]:
        """Shards the index left something out of: read by position."""
        if getattr(self, "_gappy_cache", None) is None:
            self._gappy_cache = {row.shard for row in self.skipped}
        return self._gappy_cache

    def skip_counts(self) -> dict[str, int]:
        """{reason: number of skipped rows}, reasons in SKIP_REASONS order."""
        counts = {r: 0 for r in SKIP_REASONS}
        for row in self.skipped:
            counts[row.reason] = counts.get(row.reason, 0) + 1
        return {r: c for r, c in counts.items() if c}

    def __len__(self) -> int:
        return int(self.counts.sum())

    @property
    def offsets(self) -> np.ndarray:
        """(num_shards,) int64: global index of each shard's first sample."""
        return self.offsets_of(self.counts)

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
        if self.skipped:  # which samples exist; an index that left nothing out hashes as before
            h.update(self.positions.tobytes())
            h.update("".join(f"{r.shard}\0{r.member}\0{r.reason}\n" for r in self.skipped).encode())
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
            for name in ("counts", "sizes", "mtimes", "positions"):
                f.create_dataset(name, data=getattr(self, name))
            f.create_dataset("members", data=self.members.astype(object), dtype=str_dt)
            for name in ("shard", "member", "reason", "message"):
                f.create_dataset(f"skipped/{name}", dtype=str_dt,
                                 data=np.array([getattr(r, name) for r in self.skipped], dtype=object))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ShardIndex":
        import h5py

        path = os.fspath(path)
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") not in _READ_FORMATS:
                    raise DataError(f"{path} is not a clipbd shard index (format {f.attrs.get('format')!r}); "
                                    "rebuild it with build_index")
                skipped = [Skipped(*row) for row in zip(*(f[f"skipped/{n}"].asstr()[:].tolist() for n in
                                                          ("shard", "member", "reason", "message")))
                           ] if "skipped" in f else []
                return cls(shards=list(f["shards"].asstr()[:]), counts=f["counts"][:],
                           keys=np.asarray(f["keys"].asstr()[:], dtype=str),
                           sizes=f["sizes"][:], mtimes=f["mtimes"][:],
                           positions=f["positions"][:] if "positions" in f else None,
                           members=np.asarray(f["members"].asstr()[:], dtype=str) if "members" in f else None,
                           skipped=skipped)
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
    return _shard_entries(path)[0]


def _shard_entries(path: str) -> tuple[list[str], list[str]]:
    """(keys, image member names) of one shard from headers only; any problem raises DataError."""
    path = os.fspath(path)
    with _open_tar(path) as tf:
        keys, members = [], []
        for key, group, _ in _group(_members(tf, path), path):
            keys.append(key)
            members.append(group[_image_ext(group, path, key)].name)
        return keys, members


def scan_shard(path: str) -> tuple[list[str], list[str], list[int], list[Skipped]]:
    """(keys, image members, raw positions, skipped) of one shard, reading every sample as the
    loader will (members, caption, metadata, a full image decode): the samples that fail are
    left out, each with its reason; a shard that breaks off keeps the samples before the break."""
    path = os.fspath(path)
    keys: list[str] = []
    members: list[str] = []
    raws: list[int] = []
    skipped: list[Skipped] = []
    try:
        tf = _open_tar(path)
    except DataError as e:
        return keys, members, raws, [Skipped(path, e.member, e.reason, str(e))]
    with tf:
        try:
            for raw, (key, group, problem) in enumerate(_group(_members(tf, path), path, strict=False)):
                try:
                    if problem is not None:
                        raise problem
                    sample = _read_sample(tf, path, key, group, raw)
                    decode_image(sample, f"{path}:{key}")  # the loader's own decode: the same verdict
                except DataError as e:
                    skipped.append(Skipped(path, key, e.reason, str(e)))
                    continue
                keys.append(key)
                members.append(group[sample.ext].name)
                raws.append(raw)
        except DataError as e:  # the tar itself broke off (the group being read is lost with it)
            skipped.append(Skipped(path, e.member, e.reason, str(e)))
    return keys, members, raws, skipped


ON_ERROR = ("skip", "raise")


def build_index(shards: str | Sequence[str], progress: bool = True, workers: int = 1,
                on_error: str = "raise") -> ShardIndex:
    """Index shards (a spec or a list); keys must be unique across the shards.

    on_error="raise" (training: losing samples changes the experiment): from tar headers only, no
    image is read or decoded; a corrupt tar, a duplicate key (within a shard or across shards) or
    an incomplete sample raises DataError; images and captions are checked when they are read.
    on_error="skip" (scans): every sample is read and its image decoded once, here; samples that
    fail (and a later repeat of a key) are left out of the index and listed in `index.skipped`,
    so every stage reading through the index sees the same samples.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error={on_error!r}: must be one of {', '.join(ON_ERROR)}")
    shards = expand_shards(shards) if isinstance(shards, (str, os.PathLike)) else [os.fspath(s) for s in shards]
    stats = _stat_all(shards)  # before reading, so a shard rewritten meanwhile looks stale later
    from tqdm import tqdm

    read = scan_shard if on_error == "skip" else lambda p: (*_shard_entries(p), None, [])
    with ThreadPoolExecutor(max(1, workers)) as pool:
        per_shard = list(tqdm(pool.map(read, shards), total=len(shards), disable=not progress,
                              desc="index shards", unit="shard"))
    keys = np.array([k for ks, *_ in per_shard for k in ks], dtype=str)
    members = np.array([m for _, ms, *_ in per_shard for m in ms], dtype=str)
    counts = np.array([len(ks) for ks, *_ in per_shard], np.int64)
    raws = None if on_error == "raise" else np.array([r for *_, rs, _ in per_shard for r in rs], np.int64)
    skipped = [row for *_, rows in per_shard for row in rows]
    keep = _first_of_each_key(keys, counts, shards, on_error, skipped)
    order = {p: i for i, p in enumerate(shards)}
    if not keep.all():
        sid = np.repeat(np.arange(len(shards)), counts)
        counts = np.bincount(sid[keep], minlength=len(shards)).astype(np.int64)
        keys, members, raws = keys[keep], members[keep], raws[keep]
    return ShardIndex(shards=list(shards), counts=counts, keys=keys, members=members, positions=raws,
                      sizes=np.array([s for s, _ in stats], np.int64), mtimes=np.array([m for _, m in stats], np.int64),
                      skipped=sorted(skipped, key=lambda r: order[r.shard]))


def _first_of_each_key(keys: np.ndarray, counts: np.ndarray, shards: list[str], on_error: str,
                       skipped: list[Skipped]) -> np.ndarray:
    """Mask of the samples to keep: a key seen in an earlier shard is refused (raise) or its later
    samples are left out and recorded in `skipped` (skip). Keys within a shard are unique already."""
    keep = np.ones(len(keys), bool)
    if len(keys) == 0:
        return keep
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    later = np.nonzero(first[inverse] != np.arange(len(keys)))[0]
    if len(later) == 0:
        return keep
    sid = np.repeat(np.arange(len(shards)), counts)
    for i in later.tolist():
        k, a, b = keys[i], shards[sid[first[inverse[i]]]], shards[sid[i]]
        msg = (f"duplicate key {k!r} in shards {a} and {b} ({len(later)} repeated key(s) in all): a key names "
               "one sample; deduplicate the shards, or set data.on_error=skip to keep the first of each")
        if on_error == "raise":
            raise DataError(msg, reason="duplicate_key", member=k)
        skipped.append(Skipped(b, k, "duplicate_key", msg))
    keep[later] = False
    return keep


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
        """Rename the temp file into place — unless `path` already holds the same bytes: then it is
        kept as it is (its mtime, which the shard index fingerprints, stays)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            if os.path.isfile(self.path) and filecmp.cmp(self.tmp, self.path, shallow=False):
                os.remove(self.tmp)
            else:
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


def write_skipped(path: str | os.PathLike, rows: Sequence[Skipped]) -> None:
    """`skipped.csv`: one row per skipped sample or shard (shard, member, reason, message), atomically."""
    import csv

    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["shard", "member", "reason", "message"])
            w.writerows([r.shard, r.member, r.reason, r.message] for r in rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
