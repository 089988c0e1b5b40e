"""Thumbnails of chosen training samples, read from their shards through the index, seen as the model
was trained on them: a poisoned sample with its trigger (the same `attack.apply` the loader uses)."""

from __future__ import annotations

import base64
import io
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from clipbd.data.shards import ShardIndex, decode_image, iter_shard


def read_images(index: ShardIndex, indices: Sequence[int], to_tensor: Callable, lookup: Any = None,
                attack: Any = None) -> dict[int, "np.ndarray"]:
    """{global index: image [H, W, 3] uint8} for `indices`; only their tar members are read (each
    shard once, stopping after its last wanted sample). With a poison `lookup` and `attack`, a
    planned sample gets its trigger as in training (clipbd.data.loader.ShardDataset._decode)."""
    idx = np.unique(np.asarray(indices, dtype=np.int64))
    shard_ids, _ = index.locate(idx)
    out: dict[int, np.ndarray] = {}
    for sid in np.unique(shard_ids):
        mine = idx[shard_ids == sid]
        raw = index.positions[mine]  # raw member-group ordinals in the tar, ascending with mine
        path = index.shards[int(sid)]
        for g, s in zip(mine.tolist(), iter_shard(path, positions=raw.tolist())):
            img = to_tensor(decode_image(s.image, f"{path}:{s.key}"))
            entry = lookup.get(g) if lookup is not None else None
            if entry is not None and attack is not None:
                img, _ = attack.apply(img, s.caption, entry)
            out[g] = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return out


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
