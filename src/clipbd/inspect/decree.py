"""DECREE (Feng et al., CVPR 2023, "Detecting Backdoors in Pre-trained Encoders"): invert the
smallest trigger (mask m, pattern p) under which every stamped image collapses to one embedding.
A trojaned encoder needs a much smaller mask than a clean one (§4.2: "PL1", the mask's L1 norm as
a share of the image).

One inversion (`invert`), nanoGPT-style on one screen; the λ schedule (`LambdaSchedule`) is a small
pure state machine so that it can be tested on a scripted sequence of successes and failures.
Variables and defaults follow the published code (GiantSeaweed/DECREE main.py, its CLIP driver
run_decree.py):

    m = clip(tanh(m_raw) / (2 − ε) + 0.5, 0, 1)            [H, W]   shared over the 3 channels
    p = clip(tanh(p_raw) / (2 − ε) + 0.5, 0, 1)            [3, H, W]
    x' = clip((1 − m)·x + m·p, 0, 1),  then the normalisation, then the image tower f
    loss = −mean_{i≠j} cos(f(x'_i), f(x'_j)) + λ·‖m‖₁       (published: ‖m‖₁ of the 3-channel copy)

Adam (betas 0.5, 0.9) on (m_raw, p_raw); lr steps by epoch; a step "succeeds" when the mean
cosine exceeds the threshold (0.99); the best trigger is the smallest mask among successful steps
(the mask the step was evaluated with); stop when the best has not improved for more than
`early_stop_patience` steps and the epoch's mean cosine exceeds the threshold.

Units. The published code works on 0–255 images (pattern ×255); in [0, 1] the same stamp is the
same image, so nothing changes but the scale. It reports the L1 of the channel-replicated mask
(3·Σm); `l1` here is Σm of the 2-D mask, and PL1 = l1 / (H·W) ∈ [0, 1] — the share of pixels the
trigger covers (third-party reproductions divide the 3-channel sum by H·W, which can exceed 1).

Precision: the variables and the stamp are float64 as published (`dtype`); the stamped batch is
cast to the model's dtype for the forward pass. The stamp costs nothing next to the encoder, and
float64 keeps the tanh box's saturated ends (m ≈ 0 or 1) from rounding, so the L1 the schedule
and the best-trigger rule compare is not quantised.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

Encode = Callable[[torch.Tensor], torch.Tensor]  # normalised images [B, 3, H, W] -> embeddings [B, D]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what the published code normalises CLIP inputs with
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DecreeConfig:
    """Every constant of the inversion (conf/decree/default.yaml holds the same values)."""

    lr: float = 0.5  # the published CLIP driver's (run_decree.py; main.py's CLI default is 1e-3)
    lr_steps: Sequence[Sequence[float]] = ((200, 0.1), (500, 0.05))  # (from epoch, absolute lr)
    batch_size: int = 32  # the published CLIP driver's
    max_epochs: int = 1000
    betas: Sequence[float] = (0.5, 0.9)
    success_threshold: float = 0.99  # mean off-diagonal cosine of a successful step
    lambda_init: float = 1e-3
    lambda_factor: float = 5.0  # λ ×= / ÷= this after a run of successes / failures
    lambda_max: float = 1e5  # λ is raised only while below this
    lambda_min: float = 1e-7  # λ is lowered only while at or above this (1e-5 for CIFAR/STL)
    patience: int = 5  # more than this many consecutive successes (failures) raise (lower) λ
    reset_patience: int = 10  # λ < lambda_min and more than this many successes: reset to lambda_init
    early_stop_patience: int = 35  # steps without a smaller best mask (10 for CIFAR/STL)
    reg_channels: int = 3  # the regulariser's L1 counts the mask this many times (published: 3)
    eps: float = 1e-7  # the tanh box's margin
    dtype: str = "float64"  # float64 (published) | float32: the mask/pattern variables and stamp
    init: str = "rand"  # rand: m, p ~ U(0, 1) before the inverse box (published `--mask_init rand`)


def config_from(values: Mapping[str, Any]) -> DecreeConfig:
    """DecreeConfig from a config section (`decree.inversion`); an unknown key fails in one line."""
    names = [f.name for f in fields(DecreeConfig)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"decree.inversion: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    return DecreeConfig(**dict(values))


@dataclass
class DecreeResult:
    """The best trigger and how it was found. mask [H, W], pattern [3, H, W], both in [0, 1]."""

    mask: torch.Tensor
    pattern: torch.Tensor
    found: bool  # a successful step occurred; if not, mask/pattern are the last step's
    l1: float  # Σ m of the 2-D mask (H·W if nothing was found: the whole image collapses anything)
    pl1: float  # l1 / (H·W), in [0, 1]
    l1_published: float  # reg_channels · Σ m: the number the published code prints
    seconds: float
    epochs: int
    steps: int
    stopped_early: bool
    curve: dict[str, list[float]] = field(default_factory=dict)  # per step: cos, l1, lambda, lr

    def summary(self) -> dict:
        """JSON-ready fields (no tensors, no curve)."""
        keys = ("found", "l1", "pl1", "l1_published", "seconds", "epochs", "steps", "stopped_early")
        return {k: getattr(self, k) for k in keys} | {"image_size": list(self.mask.shape)}


# ------------------------------------------------------------------------------ the λ schedule
@dataclass
class LambdaSchedule:
    """The published λ adaptation (main.py), one `step(success)` per optimisation step:
    1. λ < λ_min and success for more than `reset_patience` steps in a row: λ = λ_init, counters 0;
    2. count consecutive successes (up) / failures (down);
    3. up > patience: λ ×= factor if λ < λ_max; down > patience: λ ÷= factor if λ ≥ λ_min."""

    init: float = 1e-3
    factor: float = 5.0
    max: float = 1e5
    min: float = 1e-7
    patience: int = 5
    reset_patience: int = 10
    value: float = float("nan")
    up: int = 0
    down: int = 0
    low_successes: int = 0

    def __post_init__(self) -> None:
        if math.isnan(self.value):
            self.value = self.init

    @classmethod
    def from_config(cls, cfg: DecreeConfig) -> "LambdaSchedule":
        return cls(cfg.lambda_init, cfg.lambda_factor, cfg.lambda_max, cfg.lambda_min, cfg.patience,
                   cfg.reset_patience)

    def step(self, success: bool) -> float:
        """Update after a step; returns λ for the next step."""
        if self.value < self.min and success:
            self.low_successes += 1
            if self.low_successes > self.reset_patience:
                self.value, self.up, self.down = self.init, 0, 0
        else:
            self.low_successes = 0
        self.up, self.down = (self.up + 1, 0) if success else (0, self.down + 1)
        if self.up > self.patience:
            if self.value < self.max:
                self.value *= self.factor
            self.up = 0
        elif self.down > self.patience:
            if self.value >= self.min:
                self.value /= self.factor
            self.down = 0
        return self.value


# ------------------------------------------------------------------------------ stamp and loss
def box(raw: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Unconstrained logits -> [0, 1] (the published tanh box)."""
    return (torch.tanh(raw) / (2 - eps) + 0.5).clamp(0, 1)


def unbox(v: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Inverse of `box` for v in (0, 1)."""
    return torch.atanh((v - 0.5) * (2 - eps))


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x [B, 3, H, W] in [0, 1], mask [H, W], pattern [3, H, W] -> clip((1−m)·x + m·p, 0, 1)."""
    return ((1 - mask) * x + mask * pattern).clamp(0, 1)


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> (x − mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def normalisation(name: str, model_mean: Sequence[float], model_std: Sequence[float]) -> tuple:
    """(mean, std) for `decree.normalization`: model (the encoder's own preprocessing statistics)
    or imagenet (what the published code uses for CLIP: the faithful option)."""
    if name == "model":
        return tuple(model_mean), tuple(model_std)
    if name == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"decree.normalization={name!r}: must be model or imagenet")


def mean_offdiag_cos(emb: torch.Tensor) -> torch.Tensor:
    """emb [B, D] -> mean cosine over the B·(B−1) ordered pairs i ≠ j (published compute_self_cos_sim)."""
    z = F.normalize(emb, dim=-1)
    b = z.shape[0]
    sim = z @ z.T
    return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))


# ------------------------------------------------------------------------------ the inversion
def _lr_at(cfg: DecreeConfig, epoch: int) -> float:
    lr = cfg.lr
    for start, value in sorted((int(s), float(v)) for s, v in cfg.lr_steps):
        if epoch >= start:
            lr = value
    return lr


def _variables(h: int, w: int, cfg: DecreeConfig, g: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [H, W] and pattern [3, H, W] logits, drawn on the CPU generator (same on any device)."""
    if cfg.init != "rand":
        raise ValueError(f"decree.init={cfg.init!r}: only rand (the published random init) is implemented")
    dtype = getattr(torch, cfg.dtype)
    m = unbox(torch.rand(h, w, generator=g, dtype=dtype), cfg.eps).to(device).requires_grad_(True)
    p = unbox(torch.rand(3, h, w, generator=g, dtype=dtype), cfg.eps).to(device).requires_grad_(True)
    return m, p


def check_config(cfg: DecreeConfig, num_images: int) -> None:
    """One-line errors for values that cannot work, before any optimisation."""
    if cfg.dtype not in ("float64", "float32"):
        raise ValueError(f"decree.dtype={cfg.dtype!r}: must be float64 or float32")
    if cfg.batch_size < 2:
        raise ValueError(f"decree.batch_size={cfg.batch_size}: the cosine needs at least 2 images a batch")
    if num_images < 2:
        raise ValueError(f"decree: {num_images} shadow image(s); the cosine needs at least 2")
    if not 0 < cfg.success_threshold <= 1:
        raise ValueError(f"decree.success_threshold={cfg.success_threshold}: must be in (0, 1]")


def invert(encode: Encode, images: torch.Tensor, cfg: DecreeConfig, generator: torch.Generator, *,
           mean: Sequence[float], std: Sequence[float]) -> DecreeResult:
    """Invert the smallest collapsing trigger of `encode` on shadow `images` [N, 3, H, W] in [0, 1].
    `encode` maps normalised images to embeddings (e.g. model.encode_image, which the caller puts
    in eval mode); `mean`/`std` normalise the stamped images. `generator` draws the initial
    variables and each epoch's shuffle: same generator state, same result."""
    check_config(cfg, len(images))
    n, _, h, w = images.shape
    m_raw, p_raw = _variables(h, w, cfg, generator, images.device)
    opt = torch.optim.Adam([m_raw, p_raw], lr=cfg.lr, betas=tuple(cfg.betas))
    lam = LambdaSchedule.from_config(cfg)
    best_l1, best_m, best_p = math.inf, None, None
    es_best, es_count = math.inf, 0
    curve: dict[str, list[float]] = {"cos": [], "l1": [], "lambda": [], "lr": []}
    model_dtype, stopped, t0 = images.dtype, False, time.time()
    epoch = -1
    for epoch in range(cfg.max_epochs):
        lr = _lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        epoch_cos = []
        order = torch.randperm(n, generator=generator).to(images.device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:  # a last batch of one image has no pair
                continue
            m, p = box(m_raw, cfg.eps), box(p_raw, cfg.eps)                     # [H, W], [3, H, W]
            x = stamp(images[idx].to(m.dtype), m, p)                            # [b, 3, H, W]
            cos = mean_offdiag_cos(encode(normalise(x, mean, std).to(model_dtype)).to(m.dtype))
            reg = cfg.reg_channels * m.abs().sum()
            loss = -cos + lam.value * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            c, l1 = float(cos.detach()), float(m.detach().sum())
            success = c > cfg.success_threshold
            curve["cos"].append(c), curve["l1"].append(l1), curve["lambda"].append(lam.value)
            curve["lr"].append(lr)
            if success and l1 < best_l1:
                best_l1, best_m, best_p = l1, m.detach().clone(), p.detach().clone()
            if best_m is not None:  # early-stop counter: steps since the best mask last shrank
                es_count = es_count + 1 if best_l1 >= es_best else 0
            es_best = min(es_best, best_l1)
            lam.step(success)
            epoch_cos.append(c)
        if sum(epoch_cos) / max(len(epoch_cos), 1) > cfg.success_threshold and es_count > cfg.early_stop_patience:
            stopped = True
            break
    return _result(m_raw, p_raw, best_m, best_p, cfg, curve, epoch + 1, time.time() - t0, stopped)


def _result(m_raw, p_raw, best_m, best_p, cfg, curve, epochs, seconds, stopped) -> DecreeResult:
    found = best_m is not None
    if not found:  # nothing collapsed the batch: report the trivial trigger (the whole image)
        best_m, best_p = box(m_raw.detach(), cfg.eps), box(p_raw.detach(), cfg.eps)
    h, w = best_m.shape
    l1 = float(best_m.sum()) if found else float(h * w)
    return DecreeResult(mask=best_m.float(), pattern=best_p.float(), found=found, l1=l1, pl1=l1 / (h * w),
                        l1_published=cfg.reg_channels * l1, seconds=seconds, epochs=epochs,
                        steps=len(curve["cos"]), stopped_early=stopped, curve=curve)


def model_encoder(model: torch.nn.Module) -> Encode:
    """The image tower of an open_clip model (or any module with encode_image, or a plain image
    encoder) as an Encode function."""
    return model.encode_image if hasattr(model, "encode_image") else model


# ------------------------------------------------------------------------------ z-score check
@dataclass
class ZScoreResult:
    z: float
    mean_clean: float
    mean_triggered: float
    spread_clean: float  # std (default) or variance (faithful) of the clean pairwise cosines
    trojaned: bool


def _pairwise_cos(emb: torch.Tensor, diagonal: bool) -> torch.Tensor:
    z = F.normalize(emb.double(), dim=-1)
    sim = z @ z.T
    return sim.flatten() if diagonal else sim[~torch.eye(len(z), dtype=torch.bool)]


@torch.no_grad()
def zscore(clean_emb: torch.Tensor, triggered_emb: torch.Tensor, *, faithful: bool = False,
           threshold: float = 2.5) -> ZScoreResult:
    """DECREE's check for text-target encoders (compute_zscore.py): do triggered images [N, D]
    embed much closer to each other than the same images clean [N, D] do?
    Default: z = (mean_trig − mean_clean) / std_clean over pairs i ≠ j. faithful: the published
    form — all N² pairs (diagonal included) and the population *variance* in the denominator.
    trojaned: z > threshold (published 2.5)."""
    if clean_emb.shape != triggered_emb.shape or len(clean_emb) < 2:
        raise ValueError(f"zscore: need the same N ≥ 2 images clean and triggered, got "
                         f"{tuple(clean_emb.shape)} and {tuple(triggered_emb.shape)}")
    c, t = _pairwise_cos(clean_emb, faithful), _pairwise_cos(triggered_emb, faithful)
    spread = float(c.var(unbiased=False)) if faithful else float(c.std(unbiased=False))
    z = (float(t.mean()) - float(c.mean())) / spread
    return ZScoreResult(z=z, mean_clean=float(c.mean()), mean_triggered=float(t.mean()),
                        spread_clean=spread, trojaned=z > threshold)


# ------------------------------------------------------------------------------ verdicts
PAPER_PL1_THRESHOLD = 0.1  # Feng et al.: PL1 below 0.1 flags a trojaned encoder (224-px encoders)


def calibrated_threshold(clean_pl1: Sequence[float], method: str = "min_factor", factor: float = 0.5,
                         z: float = 3.0) -> float:
    """A PL1 threshold from clean encoders only (same resolution and architecture family):
    min_factor: factor · min(clean PL1) — flags an encoder that needs less than `factor` of the
      smallest mask any clean encoder needed (needs ≥ 1 clean encoder);
    zscore: mean − z · std of the clean PL1s (population std; needs ≥ 2)."""
    vals = [float(v) for v in clean_pl1]
    if method == "min_factor":
        if not vals:
            raise ValueError("decree.calibration: min_factor needs at least one clean PL1")
        return factor * min(vals)
    if method == "zscore":
        if len(vals) < 2:
            raise ValueError(f"decree.calibration: zscore needs at least two clean PL1s, got {len(vals)}")
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
        return mu - z * sd
    raise ValueError(f"decree.calibration.method={method!r}: must be min_factor or zscore")


def mask_share_in(mask: torch.Tensor, region: torch.Tensor) -> float:
    """Share of the mask's mass inside `region` ([H, W] or [1, H, W] of 0/1): how much of an
    inverted trigger lies on the true one."""
    region = region.reshape(mask.shape).to(mask.dtype)
    total = float(mask.sum())
    return float((mask * region).sum()) / total if total > 0 else 0.0
