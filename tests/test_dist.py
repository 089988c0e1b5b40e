"""Distribution without a cluster: batch slicing across ranks, the extraction task split, and the
contrastive loss over 2 gloo processes against one process holding the whole batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from clipbd.data.loader import ranks_slice
from clipbd.registry import ConfigError
from clipbd.stages.extract import task_groups
from conftest import compose_cfg


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_slices_rebuild_the_global_batches(world):
    stream, batch = list(range(103)), 8
    local = batch // world
    slices = [list(ranks_slice(iter(stream), r, world, batch)) for r in range(world)]
    rebuilt = [x for b in range(len(slices[0]) // local) for s in slices for x in s[b * local:(b + 1) * local]]
    assert rebuilt == stream[: 103 // batch * batch]  # incomplete last global batch dropped on all ranks


def test_ranks_slice_needs_a_divisible_batch():
    with pytest.raises(ValueError, match="not divisible"):
        list(ranks_slice(iter(range(10)), 0, 3, 8))


def test_task_groups_cover_every_group_once():
    for n_tasks in (1, 3, 4, 7):
        seen = []
        for t in range(n_tasks):
            seen += task_groups(compose_cfg([f"extract.task={t}", f"extract.num_tasks={n_tasks}"]), 5)
        assert sorted(seen) == list(range(5))
    assert task_groups(compose_cfg(["extract.groups=[3,1,3]"]), 5) == [1, 3]
    with pytest.raises(ConfigError, match="out of range"):
        task_groups(compose_cfg(["extract.groups=[5]"]), 5)
    with pytest.raises(ConfigError, match="0 ≤ task < num_tasks"):
        task_groups(compose_cfg(["extract.task=4", "extract.num_tasks=4"]), 5)


def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_img, x_txt = torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g)
    w_img, w_txt = torch.randn(5, 4, generator=g), torch.randn(6, 4, generator=g)
    return x_img, x_txt, w_img, w_txt


def _loss_and_grads(x_img, x_txt, w_img, w_txt):
    from clipbd.models.loss import clip_loss

    w_img, w_txt = w_img.clone().requires_grad_(), w_txt.clone().requires_grad_()
    img = torch.nn.functional.normalize(x_img @ w_img, dim=-1)
    txt = torch.nn.functional.normalize(x_txt @ w_txt, dim=-1)
    loss = clip_loss(img, txt, torch.tensor(10.0))
    loss.backward()
    return loss.detach(), w_img.grad, w_txt.grad


def _rank_main(rank: int, world: int, port: int, out: dict) -> None:
    import os

    from clipbd import dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init("cpu")
    x_img, x_txt, w_img, w_txt = _features()
    n = len(x_img) // world
    rows = slice(rank * n, (rank + 1) * n)
    loss, g_img, g_txt = _loss_and_grads(x_img[rows], x_txt[rows], w_img, w_txt)
    g_img, g_txt = dist.all_reduce_sum(g_img) / world, dist.all_reduce_sum(g_txt) / world  # what DDP does
    out[rank] = (loss.item() / world, g_img, g_txt)
    dist.shutdown()


def test_clip_loss_on_two_gloo_ranks_equals_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(2, port, out), nprocs=2, join=True)
        results = dict(out)
    loss, g_img, g_txt = _loss_and_grads(*_features())
    for rank in (0, 1):
        r_loss, r_img, r_txt = results[rank]
        assert abs(r_loss - loss.item()) < 1e-6  # every rank reports the global batch's loss
        assert torch.allclose(r_img, g_img, atol=1e-6) and torch.allclose(r_txt, g_txt, atol=1e-6)
