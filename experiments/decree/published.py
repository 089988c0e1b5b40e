"""A straight re-statement of the published DECREE loop (GiantSeaweed/DECREE main.py, CLIP branch,
`--mask_init rand`, driven as run_decree.py does: lr 0.5, batch 32, seed 80), as the reference that
clipbd.inspect.decree is compared with. Written here from the published code's arithmetic, in its
order and units (0–255 images in HWC layout, float64 variables, global RNG seeded once, ImageNet or
the model's statistics); only the per-image normalisation loop is written as one batched op.

    regular_best = the smallest 3-channel mask L1 among successful steps (what main.py returns)
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-7


def _self_cos(emb: torch.Tensor) -> torch.Tensor:  # utils.compute_self_cos_sim
    n = emb.shape[0]
    z = F.normalize(emb, dim=-1)
    sim = z @ z.t()
    keep = (torch.ones_like(sim) - torch.eye(n)).bool()
    return sim.masked_select(keep).view(n, -1).mean()


def _lr(epoch: int, lr: float) -> float:  # adjust_learning_rate, CLIP thresholds [200, 500]
    return lr if epoch < 200 else (0.1 if epoch < 500 else 0.05)


def published_decree(visual: torch.nn.Module, images01: torch.Tensor, mean, std, *, lr: float = 0.5,
                     batch_size: int = 32, seed: int = 80, epochs: int = 1000,
                     time_limit_s: float | None = None) -> dict:
    """images01 [N, 3, H, W] in [0, 1] (the shadow set); visual: the image tower (model.visual).

    time_limit_s (not in the published code): stop after the first epoch that ends past it and return
    the best trigger so far, marked `stopped: "time"`. `trace` holds the best-so-far PL1 after every
    epoch, so a stopped run still says how the published loop's answer moved."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    data = (images01.permute(0, 2, 3, 1) * 255).double()  # [N, H, W, 3] in 0..255 (uint8 range)
    h, w = data.shape[1:3]
    mask_2d = torch.rand((h, w), dtype=torch.float64)
    patch = torch.rand((h, w, 3), dtype=torch.float64)
    mask_2d = torch.arctanh((mask_2d - 0.5) * (2 - EPS)).requires_grad_(True)
    patch = torch.arctanh((patch - 0.5) * (2 - EPS)).requires_grad_(True)
    opt = torch.optim.Adam(params=[mask_2d, patch], lr=lr, betas=(0.5, 0.9))
    m_ = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s_ = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    init_lambda, lam, adapt, patience, thr = 1e-3, 1e-3, 5.0, 5, 0.99
    regular_best = 1 / EPS
    es_best, es_cnt = regular_best, 0
    up_cnt = down_cnt = 0
    set_cnt, set_patience = 0, 2 * patience
    lambda_min, es_patience = 1e-7, 7 * patience
    start = time.time()
    e = -1
    stopped, trace = "epochs", []
    for e in range(epochs):
        for g in opt.param_groups:
            g["lr"] = _lr(e, lr)
        cos_list = []
        order = torch.randperm(len(data))  # DataLoader(shuffle=True) with the global RNG
        for b in range(0, len(data), batch_size):
            x = data[order[b:b + batch_size]]
            mask3 = mask_2d.unsqueeze(2).repeat(1, 1, 3)
            mask_t = torch.clip(torch.tanh(mask3) / (2 - EPS) + 0.5, 0, 1)
            patch_t = torch.clip((torch.tanh(patch) / (2 - EPS) + 0.5) * 255, 0, 255)
            bd = torch.clip((1 - mask_t) * x + mask_t * patch_t, 0, 255)
            bd_in = ((bd.permute(0, 3, 1, 2) / 255.0 - m_) / s_).float()
            loss_cos = -_self_cos(visual(bd_in))
            loss_reg = torch.sum(torch.abs(mask_t))
            loss = loss_cos + loss_reg * lam
            opt.zero_grad()
            loss.backward()
            opt.step()
            cos_list.append(float(loss_cos.detach()))
            if torch.abs(loss_cos) > thr and loss_reg < regular_best:
                regular_best = float(loss_reg.detach())
            if regular_best < 1 / EPS:
                es_cnt = es_cnt + 1 if regular_best >= es_best else 0
            es_best = min(regular_best, es_best)
            if lam < lambda_min and torch.abs(loss_cos) > thr:
                set_cnt += 1
                if set_cnt > set_patience:
                    lam, up_cnt, down_cnt = init_lambda, 0, 0
            else:
                set_cnt = 0
            if torch.abs(loss_cos) > thr:
                up_cnt, down_cnt = up_cnt + 1, 0
            else:
                up_cnt, down_cnt = 0, down_cnt + 1
            if up_cnt > patience:
                if lam < 1e5:
                    lam *= adapt
                up_cnt = 0
            elif down_cnt > patience:
                if lam >= lambda_min:
                    lam /= adapt
                down_cnt = 0
        trace.append({"epoch": e + 1, "seconds": round(time.time() - start, 1), "mean_cos": float(-np.mean(cos_list)),
                      "best_pl1": regular_best / 3 / (h * w) if regular_best < 1 / EPS else None})
        if abs(np.mean(cos_list)) > thr and es_cnt > es_patience:
            stopped = "early_stop"
            break
        if time_limit_s is not None and time.time() - start > time_limit_s:
            stopped = "time"
            break
    found = regular_best < 1 / EPS
    l1_2d = regular_best / 3 if found else float(h * w)
    return {"l1_published": regular_best if found else None, "pl1": l1_2d / (h * w), "found": found,
            "seconds": time.time() - start, "epochs": e + 1, "stopped": stopped, "trace": trace}
