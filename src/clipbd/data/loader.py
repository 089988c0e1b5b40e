"""Samples for torch: shard reading (clipbd.data.shards) + decoding + on-the-fly poisoning.

Pipeline, in this order:
  1. shard order  — shuffled per epoch for training (seeded), index order otherwise;
  1b. exclude      — samples listed in `exclude` are never read (filter-and-retrain);
  2. split shards — across dataloader workers (each reads whole shards, so a sample's global index
                    is its shard offset plus its position, with no key lookup);
  3. read + decode — one tar member group -> PIL image + caption (errors name shard and key);
  4. to tensor     — resize/crop to the model's resolution, [0, 1] floats;
  5. poison        — if the global index is in the plan: trigger on pixels, caption replaced;
                    after resizing so a patch is the same pixels for every source resolution;
  6. shuffle buffer — training only, seeded per epoch.
Steps 3–5 run last in fact, on the undecoded samples that leave the shuffle buffer (the buffer holds
bytes, not tensors, and the order is the same): with `batch_slice=(rank, world, global_batch)` every
rank reads the same sample stream, cuts it into global batches and decodes only its own slice of each
(`ranks_slice`), so the global batch is the same samples in the same order for any number of ranks.
That is the exact mode (`train.reading=exact`, the default). `rank_shards=(rank, world)` is the mode
for large runs (`train.reading=by_rank`, as OpenCLIP's split-by-node with resampled shards): after
the seeded shard shuffle each rank takes every world-th shard and reads only those, so every byte is
read by one rank instead of all of them; with several ranks each one cycles through its shards
(in another order each pass) and the trainer takes a fixed number of batches. The global batch then
depends on the number of ranks — the price of reading 1/world of the data per rank. With one rank
it is the exact mode's stream.
Normalisation happens on the batch, after collation.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipbd.attacks.plan import PoisonLookup
from clipbd.data.shards import DataError, ShardIndex, build_index, decode_image, iter_shard
from clipbd.errors import ConfigError


class ShardDataset(IterableDataset):
    """Yields dicts {index, key, image [3,H,W], caption, poisoned, meta-label} from `shard_ids`."""

    def __init__(self, index: ShardIndex, shard_ids: Sequence[int], to_tensor: Callable,
                 lookup: PoisonLookup | None = None, attack: Any = None, *, shuffle_seed: int | None = None,
                 buffer: int = 0, label_key: str | None = None,
                 batch_slice: tuple[int, int, int] | None = None, exclude: Any = None,
                 rank_shards: tuple[int, int] | None = None):
        self.index, self.shard_ids = index, list(shard_ids)
        self.to_tensor, self.lookup, self.attack = to_tensor, lookup, attack
        self.shuffle_seed, self.buffer, self.label_key = shuffle_seed, buffer, label_key
        self.batch_slice = batch_slice  # (rank, world, global batch): see ranks_slice
        # global indices never read (filter-and-retrain's excluded samples, clipbd.curation.filter)
        self.exclude = None if exclude is None or not len(exclude) else frozenset(int(i) for i in exclude)
        self._offsets = index.offsets.tolist()  # once, not a cumsum per sample
        # ToModelTensor's JPEG path (the same pixels without PIL), looked up once, not per sample
        self._from_bytes = getattr(to_tensor, "from_bytes", None)
        # (rank, world): read only this rank's shards (see `by_rank_shards`) and, with more than one
        # rank, cycle through them without end (the consumer takes a fixed number of batches)
        self.rank_shards = rank_shards
        if rank_shards is not None and batch_slice is not None:
            raise ValueError("rank_shards and batch_slice are two reading modes: give one")

    def _my_shards(self, pass_: int = 0) -> list[int]:
        ids = list(self.shard_ids)
        if self.shuffle_seed is not None:
            np.random.default_rng(self.shuffle_seed).shuffle(ids)
        if self.rank_shards is not None:
            ids = ids[self.rank_shards[0]::self.rank_shards[1]]  # this epoch's shards of this rank
            if pass_ and self.shuffle_seed is not None:  # a later pass over them: another order
                np.random.default_rng([self.shuffle_seed, pass_]).shuffle(ids)
        wi = get_worker_info()
        return ids if wi is None else ids[wi.id::wi.num_workers]

    def _raw(self) -> Iterator[tuple[int, Any]]:
        """(shard id, undecoded sample) in read order."""
        if self.rank_shards is None or self.rank_shards[1] == 1:
            yield from self._pass(0)
            return
        for pass_ in itertools.count():  # by_rank over several ranks: resampled, without end
            yield from self._pass(pass_)

    def _pass(self, pass_: int) -> Iterator[tuple[int, Any]]:
        for sid in self._my_shards(pass_):
            if self.exclude is None:
                yield from ((sid, s) for s in self.index.read(sid))  # the indexed samples only
            else:
                off = int(self._offsets[sid])
                yield from ((sid, s) for s in self.index.read(sid) if off + s.pos not in self.exclude)

    def _decode(self, sid: int, s: Any) -> dict:
        path = self.index.shards[sid]
        gidx = int(self._offsets[sid] + s.pos)
        img = self._from_bytes(s.image, s.ext) if self._from_bytes is not None else None
        if img is None:
            img = self.to_tensor(decode_image(s.image, f"{path}:{s.key}"))
        caption, poisoned = s.caption, False
        entry = self.lookup.get(gidx) if self.lookup is not None else None
        if entry is not None:
            img, caption = self.attack.apply(img, caption, entry)
            poisoned = not entry.get("noise", False)  # WaNet noise-mode samples are not poisons
        item = {"index": gidx, "key": s.key, "image": img, "caption": caption, "poisoned": poisoned}
        if self.label_key is not None:
            item["label"] = int(s.meta.get(self.label_key, -1))
        return item

    def _shuffled(self) -> Iterator[tuple[int, Any]]:
        if self.buffer <= 1 or self.shuffle_seed is None:
            yield from self._raw()
            return
        wi = get_worker_info()
        rng = np.random.default_rng([self.shuffle_seed, 0 if wi is None else wi.id])
        buf: list = []
        for item in self._raw():  # reservoir-style shuffle buffer (as webdataset's .shuffle)
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            j = rng.integers(len(buf))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        stream = self._shuffled()
        if self.batch_slice is not None:
            stream = ranks_slice(stream, *self.batch_slice)
        for sid, s in stream:
            yield self._decode(sid, s)


def by_rank_shards(num_shards: int, world: int) -> None:
    """Check that `train.reading=by_rank` can give every rank shards of its own."""
    if num_shards < world:
        raise ConfigError(f"train.reading=by_rank: {num_shards} training shards for {world} ranks; every rank "
                          "needs at least one shard (use train.reading=exact, or more, smaller shards)")


def ranks_slice(stream: Iterable, rank: int, world: int, global_batch: int) -> Iterator:
    """Cut `stream` into global batches of `global_batch` items and yield this rank's contiguous
    slice of each (rank r: items [r·b, (r+1)·b), b = global_batch / world); an incomplete last global
    batch is dropped on every rank alike. Concatenating the ranks' slices in rank order (what
    `dist.all_gather_cat` does) gives back each global batch exactly as one process would see it."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} ranks")
    local, batch = global_batch // world, []
    for item in stream:
        batch.append(item)
        if len(batch) == global_batch:
            yield from batch[rank * local:(rank + 1) * local]
            batch = []


def make_loader(ds: ShardDataset, batch_size: int, workers: int = 0, drop_last: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=drop_last,
                      collate_fn=_collate, persistent_workers=False)


def batches(loader: Iterable[dict], tokenizer: Callable | None = None, depth: int = 2,
            pin: bool = False) -> Iterator[dict]:
    """The loader's batches, made `depth` ahead in a background thread (`prefetch`), each with its
    captions tokenised there too (`batch["tokens"]`, when `tokenizer` is given) and, with `pin`
    (a CUDA device), its image and token tensors in pinned memory so the copy to the GPU can be
    asynchronous (`.to(device, non_blocking=True)`). The same batches in the same order as the
    loader's: only where the work happens changes."""
    def made() -> Iterator[dict]:
        for batch in loader:
            if tokenizer is not None:
                batch["tokens"] = tokenizer(batch["caption"])
            if pin:
                batch["image"] = batch["image"].pin_memory()
                if "tokens" in batch:
                    batch["tokens"] = batch["tokens"].pin_memory()
            yield batch

    return prefetch(made(), depth)


_END = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(iterable: Iterable, depth: int = 2) -> Iterator:
    """`iterable`'s items in order, produced `depth` ahead by a background thread: the shard
    reading, decoding, poisoning and collation of the next batches overlap the model's work on this
    one (torch, PIL and zlib release the GIL; no process, so nothing is pickled or copied). The
    items are the same objects in the same order, so nothing downstream changes. An exception in
    the producer is raised here, in the consumer, where it would have been raised without the
    thread; leaving the loop early (`break`) stops the producer. depth 0: `iterable` itself."""
    if depth <= 0:
        yield from iterable
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(_Raised(e))

    thread = threading.Thread(target=produce, name="clipbd-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def _collate(items: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "key": [it["key"] for it in items],
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "poisoned": torch.tensor([it["poisoned"] for it in items], dtype=torch.bool),
    }
    if "label" in items[0]:
        out["label"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return out


def read_images(shards: Sequence[str], to_tensor: Callable, n: int) -> torch.Tensor:
    """The first `n` images of `shards` in shard order (all if fewer), as [n, 3, H, W] in [0, 1]:
    a fixed clean image set (e.g. DECREE's shadow set) without captions or poisoning."""
    ds = ShardDataset(build_index(list(shards), progress=False), range(len(shards)), to_tensor)
    images = []
    for item in ds:
        if len(images) >= n:
            break
        images.append(item["image"])
    if not images:
        raise DataError(f"no images in {len(shards)} shard(s) starting {list(shards)[:1]}")
    return torch.stack(images)
