"""Stage `pretrain`: contrastive pretraining of an open_clip model on the (poisoned) training shards.

AdamW (no weight decay on gains, biases and the logit scale, as OpenCLIP), linear warmup then cosine
decay per step (clipbd.models.train), a checkpoint at the end of every epoch (`checkpoints/epoch_N.pt`, `latest.pt`), and
resumption from `latest.pt` when the stage is re-run after an interruption (or requeued by SLURM).
`train.branch_from` continues another run's epoch checkpoint where that run is this one but for its
length and the learning rates agree up to it (`_branch`). `train.ema_decay` keeps an exponential
moving average of the weights, which later stages use as the trained model. `train.init_checkpoint`
starts from a trained model's weights instead of the seeded init: poisoned fine-tuning of a clean
model (He et al., ICML 2025's threat model) with a low lr and few epochs.

Under DDP every rank reads the same shuffled sample stream and takes its slice of each global batch
(`loader.ranks_slice`), and the loss is computed on the features gathered from all ranks: any number
of ranks sees the same global batches and follows the same loss curve as one process (up to float
rounding). Per-step losses of the global batch go to `train_loss.csv`.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from clipbd import dist, rundir, tracking
from clipbd.attacks.plan import PoisonLookup
from clipbd.curation.filter import EXCLUDED_FILE, read_excluded
from clipbd.data.loader import ShardDataset, batches, by_rank_shards, make_loader
from clipbd.data.sources import load_index
from clipbd.detectors.abl import LossRecorder, loss_path
from clipbd.errors import ConfigError
from clipbd.models import factory
from clipbd.models.loss import clip_loss, clip_loss_per_sample
from clipbd.models.train import WeightEMA, clamp_logit_scale, lr_at, make_optimizer, set_lr
from clipbd.registry import build_attack
from clipbd.runstate import note_earlier_seconds, read_marker, stage_key
from clipbd.utils import atomic_path, derive_seed, progress

DEPENDS = ("model", "train", "seed")
# which epoch files are kept and how far ahead batches are made do not change the model
UNKEYED = ("train.checkpoint_every", "train.prefetch", "train.branch_from")  # a branched run equals its from-scratch twin
UNKEYED_IF_NULL = ("train.init_checkpoint", "train.ema_decay")  # null (from scratch, no average): earlier runs' keys
# the exact reading mode is what every run before the option did: keyed only when it is not exact
# the schedule options came later: at their defaults they keep earlier runs' keys
UNKEYED_IF = {"train.reading": "exact", "train.schedule": "cosine", "train.decay_fraction": 0.2}
UPSTREAM = ("data", "poison")
# With filter.source_run set, the filter stage's exclusion list is part of this stage's key; without
# it the key is what it was before filtering existed (runs trained then are not re-trained).
UPSTREAM_IF = {"filter": "filter.source_run"}
log = logging.getLogger("clipbd")


def _resume(ckpt_dir: Path, key: str, model, opt, ema: WeightEMA | None = None) -> tuple[int, float]:
    """Load `latest.pt` if it belongs to this config; returns the first epoch still to train and the
    seconds the earlier attempts spent reaching it."""
    latest = ckpt_dir / "latest.pt"
    if not latest.exists():
        return 0, 0.0
    state = torch.load(latest, map_location="cpu", weights_only=True)
    if state.get("stage_key") != key:
        raise ConfigError(f"{ckpt_dir} holds checkpoints of a different pretraining config; use a new "
                          f"hydra.run.dir, or delete {ckpt_dir} to start over")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if ema is not None:  # the key includes train.ema_decay, so a checkpoint of this config holds the average
        ema.load_state_dict(state["ema"])
    earlier = float(state.get("elapsed_s", 0.0))  # absent in checkpoints written before it was recorded
    log.info("resuming from %s (epoch %d done, %.0f s of pretraining before)", latest, state["epoch"], earlier)
    return int(state["epoch"]), earlier


def _branch(cfg: DictConfig, key: str, steps_per_epoch: int, model, opt, ema: WeightEMA | None = None) -> int:
    """Load `train.branch_from` (another run's `epoch_N.pt`) after checking that it is this run's
    state after N epochs: trained under this config but for `train.epochs` (its stage key, recomputed
    with the source run's epochs, matches) and at the same learning rate on every one of its steps
    (lr_at under both totals). Copies the source's loss rows and per-sample losses of those epochs.
    Returns N, the epochs this run need not train."""
    tc, path = cfg.train, Path(cfg.train.branch_from)
    if not path.is_file():
        raise ConfigError(f"train.branch_from={path}: no such checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "stage_key" not in state or "optimizer" not in state:
        raise ConfigError(f"train.branch_from={path}: not a clipbd pretraining checkpoint (no optimizer state or key)")
    epoch, source = int(state["epoch"]), path.parent.parent
    try:
        src_epochs = int(OmegaConf.load(source / "config.yaml").train.epochs)
    except Exception as e:  # noqa: BLE001 - any unreadable config is the same problem
        raise ConfigError(f"train.branch_from={path}: cannot read the source run's train.epochs from "
                          f"{source / 'config.yaml'} ({e})") from e
    twin = OmegaConf.merge(cfg, {"train": {"epochs": src_epochs}})
    if stage_key(twin, "pretrain") != state["stage_key"]:
        raise ConfigError(f"train.branch_from={path}: that run differs from this one in more than train.epochs "
                          f"(data, poisons, model, seed or training settings); branch only from the same run")
    if not 0 < epoch < tc.epochs:
        raise ConfigError(f"train.branch_from={path}: epoch {epoch} is not before this run's last epoch ({tc.epochs})")
    lr = lambda step, total: lr_at(step, tc.lr, tc.warmup_steps, total, tc.schedule, tc.decay_fraction)  # noqa: E731
    steps = epoch * steps_per_epoch
    off = [s for s in range(steps) if lr(s, src_epochs * steps_per_epoch) != lr(s, tc.epochs * steps_per_epoch)]
    if off:
        raise ConfigError(f"train.branch_from={path}: step {off[0]} of its {steps} ran at another learning rate than "
                          f"this run's ({tc.schedule}, {src_epochs} vs {tc.epochs} epochs); branch from an epoch "
                          "before both schedules part (wsd: before the decay)")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    if dist.is_main():
        run_dir = Path(cfg.run_dir)
        if (source / "train_loss.csv").exists():
            with atomic_path(run_dir / "train_loss.csv") as tmp:
                Path(tmp).write_text(LOSS_HEAD + "".join(_loss_rows(source / "train_loss.csv", epoch)))
        for e in range(1, epoch + 1):
            if loss_path(source, e).exists():
                loss_path(run_dir, e).parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(loss_path(run_dir, e)) as tmp:
                    shutil.copyfile(loss_path(source, e), tmp)
                    with h5py.File(tmp, "a") as f:
                        f.attrs["stage_key"], f.attrs["branched_from"] = key, str(path)
    trained = (read_marker(source, "pretrain") or {}).get("machine") or {}
    log.info("branching from %s: epochs 1-%d as trained there%s; training epochs %d-%d here", path, epoch,
             f" ({trained.get('cpu')}, {trained.get('threads')} threads)" if trained else "", epoch + 1, tc.epochs)
    return epoch


def _save(ckpt_dir: Path, epoch: int, key: str, bundle, opt, *, elapsed_s: float = 0.0, keep: bool = True,
          ema: WeightEMA | None = None) -> Path:
    """Write `epoch_N.pt` and copy it to `latest.pt` (both atomically); keep=False removes the epoch file.
    elapsed_s: seconds the stage has spent so far over all attempts (a resumed run's marker counts them).
    With a weight average, the file holds it under `ema` beside the raw weights (`model`, for resuming);
    `factory.read_checkpoint` gives the average as the trained model."""
    extra = {"ema": ema.state_dict()} if ema is not None else {}
    path = factory.save_checkpoint(ckpt_dir / f"epoch_{epoch}.pt", bundle, optimizer=opt.state_dict(),
                                   epoch=epoch, stage_key=key, elapsed_s=elapsed_s, **extra)
    with atomic_path(ckpt_dir / "latest.pt") as tmp:
        shutil.copyfile(path, tmp)
    if not keep:
        path.unlink()
        return ckpt_dir / "latest.pt"
    return path


LOSS_HEAD = "step,epoch,loss,lr\n"


def _loss_rows(path: Path, epoch: int) -> list[str]:
    """The rows of `train_loss.csv` at `path` of 1-based epochs up to `epoch`."""
    return [ln for ln in path.read_text().splitlines(keepends=True)[1:] if int(ln.split(",")[1]) <= epoch]


def _append_losses(path: Path, epoch: int, first_step: int, losses: list[float], lrs: list[float]) -> None:
    """One row per optimizer step (step, epoch, loss, lr); an epoch's rows are written once it is done,
    before its checkpoint, replacing rows of this epoch or later that an interrupted attempt left."""
    kept = _loss_rows(path, epoch) if path.exists() and epoch > 0 else []
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(LOSS_HEAD)
        fh.writelines(kept)
        fh.writelines(f"{first_step + i},{epoch + 1},{v!r},{lr!r}\n" for i, (v, lr) in enumerate(zip(losses, lrs)))


def _excluded(cfg: DictConfig) -> np.ndarray:
    """Global indices left out of training (filter.source_run set: the filter stage's list)."""
    if cfg.filter.source_run is None:
        return np.zeros(0, dtype=np.int64)
    path = Path(cfg.run_dir) / EXCLUDED_FILE
    if not path.exists():
        raise ConfigError(f"filter.source_run={cfg.filter.source_run} but {path} is missing: run the filter "
                          "stage first (stages=[data,poison,filter,pretrain,...])")
    excluded = read_excluded(path)
    log.info("pretrain: %d samples excluded by the filter stage (%s)", len(excluded), path)
    return excluded


def main(cfg: DictConfig) -> dict[str, Path]:
    tc, info = cfg.train, dist.info()
    if tc.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every={tc.checkpoint_every}: need >= 0 (0 keeps only latest.pt)")
    ckpt_dir = rundir.checkpoint_dir(cfg)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    key = stage_key(cfg, "pretrain")
    stage_t0 = time.time()
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    bundle = factory.create(cfg.model, device=info.device)
    model = bundle.model
    if tc.init_checkpoint:  # fine-tune a trained model (resuming below still wins: it is newer)
        factory.load_weights(model, factory.read_checkpoint(tc.init_checkpoint)["state_dict"], tc.init_checkpoint)
    index = load_index(cfg)
    lookup = PoisonLookup.load(rundir.poison_plan(cfg))
    attack = build_attack(cfg)
    excluded = _excluded(cfg)
    if tc.batch_size % info.world:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the {info.world} ranks")
    local_bs = tc.batch_size // info.world
    steps_per_epoch = (len(index) - len(excluded)) // tc.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size={tc.batch_size} exceeds the {len(index)} training samples")
    total = steps_per_epoch * tc.epochs
    opt = make_optimizer(model, tc)
    ema = WeightEMA(model, tc.ema_decay) if tc.ema_decay is not None else None
    ddp = model if info.world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    start, earlier_s = _resume(ckpt_dir, key, model, opt, ema)
    if start:
        note_earlier_seconds("pretrain", earlier_s)
    elif tc.branch_from:
        start = _branch(cfg, key, steps_per_epoch, model, opt, ema)
    shard_ids = list(range(len(index.shards)))
    if tc.reading == "by_rank":
        by_rank_shards(len(shard_ids), info.world)
    for epoch in range(start, tc.epochs):
        # exact: every rank reads all shards and ranks_slice splits each global batch; by_rank:
        # each rank reads its own shards and makes its own local batches (clipbd.data.loader)
        split = ({"batch_slice": (info.rank, info.world, tc.batch_size)} if tc.reading == "exact"
                 else {"rank_shards": (info.rank, info.world)})
        ds = ShardDataset(index, shard_ids, bundle.to_tensor(), lookup, attack,
                          shuffle_seed=derive_seed(cfg.seed, f"shuffle/{epoch}"), buffer=tc.shuffle_buffer,
                          exclude=excluded, **split)
        loader = batches(make_loader(ds, local_bs, tc.workers, drop_last=True), bundle.tokenizer, tc.prefetch,
                         pin=info.device.startswith("cuda"))
        model.train()
        t0, losses, lrs = time.time(), [], []
        per_sample = LossRecorder(len(index))  # each sample's own loss this epoch (ABL detector)
        bar = progress(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False)
        for i, batch in enumerate(bar):
            if i >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + i
            set_lr(opt, lr_at(step, tc.lr, tc.warmup_steps, total, tc.schedule, tc.decay_fraction))
            images = bundle.normalize(batch["image"].to(info.device, non_blocking=True))
            texts = batch["tokens"].to(info.device, non_blocking=True)
            with factory.autocast(info.device, cfg.model.precision):
                out = ddp(images, texts)
                loss = clip_loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            clamp_logit_scale(model)
            if ema is not None:
                ema.update(model)
            losses.append(loss.item() / info.world)  # the loss of the whole global batch (same on every rank)
            lrs.append(opt.param_groups[0]["lr"])
            per_sample.add(batch["index"], clip_loss_per_sample(out["image_features"].float(),
                                                                 out["text_features"].float(), out["logit_scale"]))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % tc.log_every == 0:
                tracking.log({"train/loss": losses[-1], "train/lr": opt.param_groups[0]["lr"],
                              "train/logit_scale": model.logit_scale.exp().item()}, step=step)
        loader.close()  # stop the prefetching thread now, not when the generator is collected
        mean_loss = sum(losses) / max(1, len(losses))
        log.info("epoch %d/%d  loss %.4f  %.1f s", epoch + 1, tc.epochs, mean_loss, time.time() - t0)
        tracking.log({"train/epoch_loss": mean_loss, "train/epoch": epoch + 1}, step=(epoch + 1) * steps_per_epoch - 1)
        per_sample.merge(dist.all_reduce_sum, info.device)
        if dist.is_main():
            per_sample.write(cfg.run_dir, epoch + 1, key)  # before the checkpoint: resuming never lacks them
            _append_losses(Path(cfg.run_dir) / "train_loss.csv", epoch, epoch * steps_per_epoch, losses, lrs)
            every = tc.checkpoint_every
            _save(ckpt_dir, epoch + 1, key, bundle, opt, elapsed_s=earlier_s + time.time() - stage_t0,
                  keep=every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == tc.epochs), ema=ema)
        dist.barrier()
    return {"checkpoint": ckpt_dir / "latest.pt"}
