"""open_clip models by name (RN50, ViT-B-32, ...) or from an architecture given in config.

Nothing is downloaded: models are built with `pretrained=None`; weights come only from a local
checkpoint file (`model.checkpoint`), loaded with `weights_only=True` so no pickled code runs.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import torchvision.transforms as T
from omegaconf import DictConfig, OmegaConf

from clipbd.errors import ConfigError
from clipbd.utils import atomic_path

log = logging.getLogger("clipbd")


@dataclass
class ClipBundle:
    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str = ""
    arch: dict[str, Any] | None = None  # the registered architecture (None: open_clip's own config)

    def to_tensor(self) -> Callable:
        """PIL image -> float tensor [3, H, W] in [0, 1] at the model's resolution (triggers are
        applied here, before normalisation, so a patch means the same pixels for any model)."""
        return ToModelTensor(self.image_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised model input."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def autocast(device: str, precision: str):
    """`model.precision` amp (float16) or bf16 as a torch.autocast context on CUDA; float32 (a
    disabled context) anywhere else — pretraining and extraction alike."""
    on = precision in ("amp", "bf16") and device.startswith("cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16, enabled=on)


class CachedTokenizer:
    """open_clip's tokenizer with the token row of every caption it has seen kept (up to `size`
    distinct captions, then the cache starts again): a caption that recurs — a prompt, a template
    caption, a poisoned sample's target caption, every caption again in the next epoch — is not
    cleaned, split and BPE-encoded again. The rows are the tokenizer's own, so batches are bit for bit
    what it returns; anything else (context_length, ...) is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Callable, size: int = 200_000):
        self.tokenizer, self.size, self._rows = tokenizer, size, {}

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if context_length is not None:  # another length: not what the cache holds
            return self.tokenizer(texts, context_length=context_length)
        rows = self._rows
        new = list(dict.fromkeys(t for t in texts if t not in rows))
        if new:
            if len(rows) + len(new) > self.size:
                rows.clear()
                new = list(dict.fromkeys(texts))
            for t, row in zip(new, self.tokenizer(new)):
                rows[t] = row
        return torch.stack([rows[t] for t in texts]) if texts else self.tokenizer(texts)

    def __getattr__(self, name: str):
        if name == "tokenizer":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


@functools.cache
def _jpeg_op():
    """torchvision's JPEG decoding op (`torch.ops.image.decode_jpeg`, the kernel under
    torchvision.io.decode_jpeg, called directly: that wrapper warns on every call that torchvision's
    image IO is deprecated), or None where this torchvision has none."""
    try:
        import torchvision.io  # noqa: F401  (loads the image ops)
        return torch.ops.image.decode_jpeg
    except (ImportError, AttributeError, RuntimeError):
        return None


class ToModelTensor:
    """Resize (bicubic, shorter side) + centre crop to `size`, then [0, 1] floats: torchvision's
    Resize/CenterCrop/ToTensor, bit for bit. An RGB image already `size` x `size` (every synthetic
    image, and shards written at the model's resolution) skips the two no-op PIL copies and
    torchvision's per-call bookkeeping: the same values at a fraction of the cost per sample."""

    def __init__(self, size: int):
        self.size = size
        self.slow = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])

    def __call__(self, img) -> torch.Tensor:
        if img.size != (self.size, self.size) or img.mode != "RGB":
            img = self.slow(img)
            if img.mode != "RGB":
                return T.functional.to_tensor(img)
        arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return arr.view(self.size, self.size, 3).permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)

    def from_bytes(self, data: bytes, ext: str) -> torch.Tensor | None:
        """The same tensor as `self(decode_image(data))` for a complete 3-channel JPEG already at the
        model's size, decoded by torchvision's libjpeg-turbo call without PIL's per-image Python
        (header parsing, mode handling, copies): about 2.5x cheaper per 32-px image, bit for bit
        the same pixels (checked over the default's 10,000 training images; tests/test_data.py checks the
        synthetic world's). None for
        anything else — other formats, sizes or channel counts, a file without its end marker
        (truncated), a decoder error — which then takes the PIL path and its errors."""
        if ext not in ("jpg", "jpeg") or data[-2:] != b"\xff\xd9":
            return None
        op = _jpeg_op()
        if op is None:
            return None
        try:  # mode 0: the file's own channels; no EXIF rotation (PIL's open applies none either)
            arr = op(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, False)
        except RuntimeError:
            return None
        if arr.shape != (3, self.size, self.size):
            return None
        return arr.to(torch.get_default_dtype()).div(255)

    def __repr__(self) -> str:
        return f"ToModelTensor(size={self.size})"


def _register_arch(name: str, arch: dict[str, Any]) -> None:
    """Make `arch` (an open_clip model config: embed_dim, vision_cfg, text_cfg) known as `name`."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.json"
        path.write_text(json.dumps(arch))
        open_clip.add_model_config(path)


def create(mcfg: DictConfig, device: str = "cpu", checkpoint: str | Path | None = None) -> ClipBundle:
    """Build the model and load `checkpoint` (default: `model.checkpoint`). A clipbd checkpoint
    names its own architecture: another `model.name` is refused (the run's config.yaml would name
    a model it did not use); under the same name its recorded `arch` is used, with a warning when
    it differs from `model.arch`. An open_clip checkpoint is loaded into `model.name`."""
    checkpoint = checkpoint or mcfg.checkpoint
    ckpt = read_checkpoint(checkpoint) if checkpoint else None
    name = mcfg.name
    arch = OmegaConf.to_container(mcfg.arch, resolve=True) if mcfg.arch is not None else None
    if ckpt is not None and ckpt.get("name"):
        if ckpt["name"] != name:
            raise ConfigError(f"checkpoint {checkpoint} is a {ckpt['name']} model, but model.name={name}: "
                              f"select the model it was trained as (model.name={ckpt['name']}, e.g. the "
                              "model group of the run that wrote it), or another checkpoint")
        if ckpt.get("arch") and ckpt["arch"] != arch:
            log.warning("checkpoint %s: building %s with the architecture the checkpoint records, which differs "
                        "from model.arch in config.yaml (checkpoint vs config: %s)", checkpoint, name,
                        _arch_diff(ckpt["arch"], arch))
        arch = ckpt.get("arch") or None
    if arch is not None:
        _register_arch(name, arch)
    if name not in open_clip.list_models():
        raise ConfigError(f"model.name={name}: not an open_clip architecture and no model.arch given; "
                          f"e.g. RN50, ViT-B-32, ViT-B-16 (see open_clip.list_models())")
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(max(level, logging.ERROR))  # silence open_clip's "no pretrained weights" warning
    try:
        model = open_clip.create_model(name, pretrained=None, device=device, output_dict=True)
    finally:
        root.setLevel(level)
    if ckpt is not None:
        load_weights(model, ckpt["state_dict"], checkpoint, name)
    pcfg = model.visual.preprocess_cfg
    size = pcfg["size"] if isinstance(pcfg["size"], int) else pcfg["size"][0]
    return ClipBundle(model=model, tokenizer=CachedTokenizer(open_clip.get_tokenizer(name)), image_size=int(size),
                      mean=tuple(pcfg["mean"]), std=tuple(pcfg["std"]), name=name, arch=arch)


def _arch_diff(used: dict, configured: dict | None, prefix: str = "") -> str:
    """The first few leaves where two architecture dicts differ, `key: used vs configured`."""
    configured = configured or {}
    out = []
    for k in sorted(set(used) | set(configured)):
        a, b = used.get(k), configured.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _arch_diff(a, b, f"{prefix}{k}.")
            out += [sub] if sub else []
        elif a != b:
            out.append(f"{prefix}{k}: {a} vs {b}")
    return ", ".join(out[:4])


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """{"state_dict", "name", "arch"} from a clipbd checkpoint (which names its architecture; the
    weight average when it was trained with `train.ema_decay`), an
    open_clip training checkpoint (`{"state_dict": ...}`, DDP `module.` prefixes), a bare state
    dict, or a .safetensors file — loaded with weights_only=True: no pickled code is executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (model.checkpoint=...)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"state_dict": load_file(str(path)), "name": None, "arch": None}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if "Weights only load failed" in str(e):  # torch's refusal of a pickle that would run code
            raise ConfigError(f"checkpoint {path}: cannot be read as weights only ({type(e).__name__}: "
                              f"{first}); clipbd never executes pickled code") from None
        raise ConfigError(f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes; "
                          f"{type(e).__name__}: {first}); copy it again or use another checkpoint "
                          "(e.g. an earlier checkpoints/epoch_N.pt)") from None
    meta = {"name": obj.get("name") if isinstance(obj, dict) and "model" in obj else None,
            "arch": obj.get("arch") if isinstance(obj, dict) else None}
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict) and isinstance(obj["ema"].get("weights"), dict):
        obj = obj["ema"]["weights"]  # trained with train.ema_decay: the average is the trained model
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"checkpoint {path}: no model state dict found (keys: {list(obj)[:8]})")
    return {"state_dict": {k.removeprefix("module."): v for k, v in obj.items()}, **meta}


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: str | Path, name: str = "") -> None:
    own = model.state_dict()
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if shapes:  # another architecture: say so, not torch's one line per mismatched tensor
        k, theirs, ours = shapes[0]
        n_missing, n_extra = len(set(own) - set(sd)), len(set(sd) - set(own))
        raise ConfigError(f"checkpoint {path} is another architecture than model.name={name or '?'}: {len(shapes)} "
                          f"tensors differ in shape (e.g. {k}: {list(theirs)} in the file, {list(ours)} in the model)"
                          f", {n_missing} missing, {n_extra} unexpected; set model (model=rn50, model.name=..., "
                          "model.arch) to the architecture the checkpoint was trained as")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not fit the model: {len(missing)} missing keys "
                          f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
                          f"is model.name the architecture it was trained with?")
    log.info("loaded weights from %s", path)


def checkpoint_dict(bundle: ClipBundle, **extra: Any) -> dict[str, Any]:
    """What every clipbd checkpoint holds: the weights, and the architecture's name and config, so
    that `model.checkpoint=<file>` alone rebuilds the model; plus the writer's own fields."""
    return {"model": bundle.model.state_dict(), "name": bundle.name, "arch": bundle.arch, **extra}


def save_checkpoint(path: str | Path, bundle: ClipBundle, **extra: Any) -> Path:
    """torch.save `checkpoint_dict(bundle, **extra)` to `path` atomically."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint_dict(bundle, **extra), tmp)
    return Path(path)


def create_trained(cfg: DictConfig, device: str = "cpu") -> ClipBundle:
    """The model a run's later stages use: its own `checkpoints/latest.pt` if pretraining ran,
    else `model.checkpoint` (scanning with an existing model)."""
    latest = Path(cfg.run_dir) / "checkpoints" / "latest.pt"
    if latest.exists():
        ckpt = latest
    elif cfg.model.checkpoint:
        ckpt = cfg.model.checkpoint
    else:
        raise ConfigError("no trained model: run the pretrain stage, or set model.checkpoint=<file> "
                          "(a clipbd or open_clip checkpoint of architecture model.name)")
    bundle = create(cfg.model, device=device, checkpoint=ckpt)
    bundle.model.eval()
    return bundle
