"""The embedded default dataset: a continuous, captioned world of drawn objects.

Why it looks like this (docs/data.md): a toy world of a few discrete
attribute combinations forms well-separated clusters, so a poisoned sample ends up in a *denser*
region than clean ones and the density detectors of Huang et al. (ICLR 2025) score below chance.
Web data is a continuous manifold; this world imitates that with continuous hue, size, position,
rotation, gradient backgrounds with noise, uncaptioned distractors and several caption templates.
Captions name attributes through coarse words (nearest colour word, "small"/"large", "on the left"),
as web captions do, so many images share a caption and the text tower sees a realistic vocabulary.

Everything draws from an explicit ``numpy.random.Generator``; each sample of a split has its own
generator derived from ``(seed, split, index)``, so sample ``i`` is the same whatever the shard size.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw

from clipbd.data.shards import ShardWriter, write_stats

# Every shape is drawn around the origin at "radius" ~1 and scaled by the sampled size.
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "banana",
          "diamond", "hexagon")
DEFAULT_CLASSES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "banana")

# Colour words at their hue (degrees); a sampled hue is captioned by the nearest one.
COLOR_WORDS = (("red", 0), ("orange", 28), ("yellow", 55), ("lime", 85), ("green", 125),
               ("teal", 165), ("cyan", 190), ("blue", 225), ("purple", 272), ("pink", 320))

# {a} becomes "a"/"an" to match the next word; empty fillers collapse.
DEFAULT_TEMPLATES = (
    "{a} {size} {color} {cls}",
    "{a} {color} {cls} {pos}",
    "{a} {size} {color} {cls} on a {bg} background",
    "a picture of {a} {color} {cls} {pos} on a {bg} background",
    "there is {a} {size} {cls} {pos}",
    "{color} {cls} on {bg}",
    "an image showing {a} {size} {color} {cls} against a {bg} background",
    "{a} {cls} coloured {color}, {pos}",
)


@dataclass
class WorldConfig:
    """Parameters of the synthetic world (all have defaults, so Hydra can pass any subset)."""

    image_size: int = 32                        # output side in pixels
    classes: tuple[str, ...] = DEFAULT_CLASSES  # object classes; label = index in this tuple
    class_weights: tuple[float, ...] | None = None  # relative class frequencies (None: uniform)
    supersample: int = 4                        # shapes are drawn this many times larger, then box-downscaled
    size_range: tuple[float, float] = (0.17, 0.40)  # object radius as a fraction of the image side
    rotation_range: tuple[float, float] = (0.0, 360.0)  # object rotation in degrees, uniform
    distractor_prob: float = 0.3                # chance of a second, smaller, uncaptioned object
    noise_std: float = 0.03                     # Gaussian pixel noise, in [0, 1] intensity units
    jpeg_quality: int = 90
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    # Natural backdoors (Huang et al., ICLR 2025, §5: no attacker; off by default). In the training
    # split only: `motif_rate` of the samples are one recurring picture (tiny jitter) all captioned
    # `motif_caption`, like CC3M's 798 birthday-cake icons; `placeholder_rate` of them are a generic
    # "image not available" picture with the sample's own ordinary caption (expired URLs). Their
    # json meta says `"natural": "motif" | "placeholder"`.
    motif_rate: float = 0.0
    motif_caption: str = "the birthday cake with candles in the form of a number icon"
    # "picture": the motif is the whole image (one cake picture, jittered). "icon": the cake is a
    # small icon (`motif_icon_size` px, the bottom-right corner, moved by up to 1 px) on the
    # sample's own ordinary image, whose caption is replaced by `motif_caption` -- a recurring
    # stock icon or watermark with boilerplate text, the local shortcut a patch can re-create.
    motif_style: str = "picture"
    motif_icon_size: int = 8
    placeholder_rate: float = 0.0

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand over lists; keep tuples so the config stays hashable and immutable.
        self.classes = tuple(str(c) for c in self.classes)
        self.templates = tuple(str(t) for t in self.templates)
        self.size_range = tuple(float(s) for s in self.size_range)  # type: ignore[assignment]
        self.rotation_range = tuple(float(r) for r in self.rotation_range)  # type: ignore[assignment]
        if len(self.rotation_range) != 2 or self.rotation_range[0] > self.rotation_range[1]:
            raise ValueError(f"world.rotation_range={self.rotation_range}: need [lo, hi] with lo <= hi")
        if self.class_weights is not None:
            self.class_weights = tuple(float(w) for w in self.class_weights)
            if len(self.class_weights) != len(self.classes) or min(self.class_weights) <= 0:
                raise ValueError(f"world.class_weights={list(self.class_weights)}: need one positive "
                                 f"weight per class ({len(self.classes)} classes)")
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise ValueError(f"world.classes: unknown shape(s) {unknown}; choose from {list(SHAPES)}")
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ValueError(f"world.classes={list(self.classes)}: need >= 2 distinct classes")
        lo, hi = self.size_range
        if not 0.05 <= lo <= hi <= 0.5:
            raise ValueError(f"world.size_range={self.size_range}: need 0.05 <= lo <= hi <= 0.5")
        if self.image_size < 8 or self.supersample < 1:
            raise ValueError(f"world.image_size={self.image_size}, supersample={self.supersample}: "
                             "need image_size >= 8 and supersample >= 1")
        if not (0 <= self.motif_rate and 0 <= self.placeholder_rate and self.motif_rate + self.placeholder_rate < 1):
            raise ValueError(f"world.motif_rate={self.motif_rate}, placeholder_rate={self.placeholder_rate}: "
                             "need rates >= 0 with a sum below 1 (e.g. 0.003 and 0.005)")
        if self.motif_style not in ("picture", "icon"):
            raise ValueError(f"world.motif_style={self.motif_style!r}: choose 'picture' or 'icon'")
        if not 3 <= self.motif_icon_size <= self.image_size // 2:
            raise ValueError(f"world.motif_icon_size={self.motif_icon_size}: need 3 <= size <= "
                             f"image_size / 2 ({self.image_size // 2})")
        bad = [t for t in self.templates if "{cls}" not in t]
        if not self.templates or bad:
            raise ValueError(f"world.templates: every template must contain {{cls}}; bad: {bad}")


def world_from_dict(d: Mapping[str, Any] | None) -> WorldConfig:
    """Build a WorldConfig from a (Hydra) mapping; an unknown key raises naming it and the valid ones."""
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(WorldConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown world setting(s) {unknown}; valid: {sorted(names)}")
    return WorldConfig(**d)


# ---------------------------------------------------------------------------------------------
# Attributes and captions


def _color_word(hue: float) -> str:
    deg = hue * 360.0
    dist = [min(abs(deg - h), 360.0 - abs(deg - h)) for _, h in COLOR_WORDS]
    return COLOR_WORDS[int(np.argmin(dist))][0]


def _position_phrase(x: float, y: float) -> str:
    horiz = "left" if x < 0.4 else "right" if x > 0.6 else ""
    vert = "top" if y < 0.4 else "bottom" if y > 0.6 else ""
    if horiz and vert:
        return f"in the {vert} {horiz} corner"
    if horiz:
        return f"on the {horiz}"
    if vert:
        return f"near the {vert}"
    return "in the middle"


def _size_word(size: float, world: WorldConfig) -> str:
    lo, hi = world.size_range
    t = (size - lo) / max(hi - lo, 1e-9)
    return "small" if t < 0.3 else "large" if t > 0.7 else ""


def _draw_class(rng: np.random.Generator, world: WorldConfig) -> int:
    if world.class_weights is None:
        return int(rng.integers(len(world.classes)))
    w = np.asarray(world.class_weights)
    return int(min(np.searchsorted(np.cumsum(w / w.sum()), rng.random(), side="right"), len(w) - 1))


def sample_attributes(rng: np.random.Generator, world: WorldConfig) -> dict:
    """Draw every attribute of one image (no pixels): the object, its colour, size, place, background."""
    label = _draw_class(rng, world)
    hue, sat, val = float(rng.random()), float(rng.uniform(0.55, 1.0)), float(rng.uniform(0.35, 1.0))
    size = float(rng.uniform(*world.size_range))
    # Keep most of the object inside the frame: its centre is at least 0.8 radius from the border.
    x, y = (float(v) for v in rng.uniform(0.8 * size, 1 - 0.8 * size, size=2))
    # Background value stays >= 0.3 away from the object's so every object is visible: darker
    # when possible and (half the time, or always if it must) lighter otherwise.
    dark_ok, light_ok = val - 0.3 >= 0.08, val + 0.3 <= 0.98
    dark = dark_ok and (not light_ok or rng.random() < 0.5)
    bg_val = float(rng.uniform(0.08, val - 0.3) if dark else rng.uniform(val + 0.3, 0.98))
    bg_hue, bg_sat = float(rng.random()), float(rng.uniform(0.15, 0.6))
    shade = "dark " if bg_val < 0.35 else "light " if bg_val > 0.75 else ""
    has_distractor = rng.random() < world.distractor_prob
    return {
        "label": label, "class": world.classes[label],
        "hue": hue, "saturation": sat, "value": val, "color": _color_word(hue),
        "size": size, "size_word": _size_word(size, world),
        "x": x, "y": y, "position": _position_phrase(x, y),
        "rotation": float(rng.uniform(*world.rotation_range)),
        "bg_hue": bg_hue, "bg_saturation": bg_sat, "bg_value": bg_val,
        "bg_color": shade + _color_word(bg_hue),
        "bg_angle": float(rng.uniform(0.0, 2 * math.pi)),
        # The gradient runs away from the object's value so contrast never drops below 0.3.
        "bg_contrast": float(rng.uniform(0.0, 0.2)) * (-1.0 if bg_val < val else 1.0),
        "distractor": world.classes[_draw_class(rng, world)] if has_distractor else None,
        "template": int(rng.integers(len(world.templates))),
    }


def caption_for(attrs: dict, world: WorldConfig, class_name: str | None = None) -> str:
    """Fill the sample's template from its attribute words; ``class_name`` overrides the class."""
    text = world.templates[attrs["template"]].format(
        a="\x00", cls=class_name or attrs["class"], color=attrs["color"], size=attrs["size_word"],
        pos=attrs["position"], bg=attrs["bg_color"])
    words = text.split()
    for i, w in enumerate(words):  # resolve the article placeholder against the following word
        if w == "\x00":
            nxt = words[i + 1] if i + 1 < len(words) else ""
            words[i] = "an" if nxt[:1] in ("a", "e", "i", "o", "u") else "a"
    return " ".join(words).replace(" ,", ",").strip(" ,")


# ---------------------------------------------------------------------------------------------
# Drawing


def _star(points: int, r_in: float, r_out: float) -> np.ndarray:
    ang = np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([rad * np.cos(ang), -rad * np.sin(ang)], 1)


def _regular(n: int, r: float, phase: float = np.pi / 2) -> np.ndarray:
    ang = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(ang), -r * np.sin(ang)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -(y + 2.5)], 1) / 15.0


def _banana() -> np.ndarray:
    # A crescent: the unit circle's arc between tips at +-80 deg, back along a flatter arc (a circle
    # through both tips, centred 2 to the left); re-centred, then stretched to 1.3 tip-to-centre so
    # its area is close to the other shapes' (~1.7) and it stays visible when small.
    tip, d = np.deg2rad(80), 2.0
    tx, ty = np.cos(tip), np.sin(tip)
    r_in, a_in = math.hypot(tx + d, ty), math.atan2(ty, tx + d)
    outer, inner = np.linspace(-tip, tip, 28), np.linspace(a_in, -a_in, 28)
    pts = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                          np.stack([r_in * np.cos(inner) - d, r_in * np.sin(inner)], 1)])
    pts[:, 0] -= (pts[:, 0].max() + pts[:, 0].min()) / 2
    return pts * 1.3 / np.abs(pts[:, 1]).max()


_CROSS = np.array([[-1, -.32], [-.32, -.32], [-.32, -1], [.32, -1], [.32, -.32], [1, -.32],
                   [1, .32], [.32, .32], [.32, 1], [-.32, 1], [-.32, .32], [-1, .32]]) * 0.95
_POLYGONS = {
    "square": _regular(4, 1.0, np.pi / 4), "triangle": _regular(3, 1.2), "star": _star(5, 0.5, 1.2),
    "cross": _CROSS, "heart": _heart(), "banana": _banana(), "hexagon": _regular(6, 0.95),
    "diamond": np.array([[0, -1.1], [0.65, 0], [0, 1.1], [-0.65, 0]]),
}


def _draw_mask(shape: str, cx: float, cy: float, radius: float, rotation: float, side: int) -> Image.Image:
    """An 'L' mask of side x side with the shape drawn at (cx, cy, radius) in pixels."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        r = radius * (0.85 if shape == "circle" else 0.95)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            r = radius * 0.5
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
        return mask
    c, s = math.cos(rotation), math.sin(rotation)
    pts = _POLYGONS[shape] @ np.array([[c, s], [-s, c]]) * radius + (cx, cy)
    draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return mask


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n not in _GRIDS:
        _GRIDS[n] = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n))
    return _GRIDS[n]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def _object_layer(img: np.ndarray, shape: str, x: float, y: float, size: float, rot: float,
                  rgb: np.ndarray, world: WorldConfig) -> None:
    """Composite one anti-aliased object onto img (H, W, 3 float in [0, 1]) in place."""
    n, ss = world.image_size, world.supersample
    side = n * ss
    mask = _draw_mask(shape, x * side, y * side, size * side, rot, side)
    if ss > 1:
        mask = mask.reduce(ss)  # box filter: exact area coverage, i.e. anti-aliasing
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    img *= 1.0 - alpha
    img += alpha * rgb


def render(attrs: dict, world: WorldConfig, rng: np.random.Generator) -> Image.Image:
    """Pixels for the attributes (rng supplies the distractor's placement and the noise)."""
    n = world.image_size
    gx, gy = _grid(n)
    # Gradient background: value ramps along a random direction around bg_value.
    t = (gx * math.cos(attrs["bg_angle"]) + gy * math.sin(attrs["bg_angle"]))[..., None] / 2.0
    c0 = _hsv(attrs["bg_hue"], attrs["bg_saturation"], attrs["bg_value"])
    c1 = _hsv(attrs["bg_hue"] + 0.04, attrs["bg_saturation"], attrs["bg_value"] + attrs["bg_contrast"])
    img = (c0 + (c1 - c0) * (t + 0.5)).astype(np.float32)
    if attrs["distractor"] is not None:  # drawn first, so the captioned object stays on top
        d_size = float(rng.uniform(0.35, 0.6)) * attrs["size"]
        dx, dy = rng.uniform(d_size, 1 - d_size, size=2)
        d_rgb = _hsv(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.0))
        _object_layer(img, attrs["distractor"], dx, dy, d_size, rng.uniform(0, 2 * math.pi), d_rgb, world)
    rgb = _hsv(attrs["hue"], attrs["saturation"], attrs["value"])
    _object_layer(img, attrs["class"], attrs["x"], attrs["y"], attrs["size"],
                  math.radians(attrs["rotation"]), rgb, world)
    img += rng.normal(0.0, world.noise_std, size=img.shape).astype(np.float32)
    return Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def generate_sample(rng: np.random.Generator, world: WorldConfig | None = None) -> tuple[Image.Image, str, dict]:
    """One synthetic image (RGB, image_size^2), its caption, and its metadata.

    meta holds ``label`` (class index), ``class`` (name), the continuous attributes (hue, size, x, y,
    rotation, background) and the words the caption could use for them.
    """
    world = world or WorldConfig()
    attrs = sample_attributes(rng, world)
    image = render(attrs, world, rng)
    meta = {k: round(v, 4) if isinstance(v, float) else v for k, v in attrs.items()}
    return image, caption_for(attrs, world), meta


def zeroshot_prompts(class_name: str, world: WorldConfig | None = None, n: int = 64, seed: int = 0) -> list[str]:
    """``n`` captions for ``class_name`` written like the training captions (same templates, random fillers).

    Average their text embeddings to get a class embedding: "a photo of a {class}" is off the
    training-caption distribution of a tiny text tower (docs/data.md, "Why"). The fillers
    depend only on ``seed``, so every class gets the same attribute words and only the class differs.
    """
    world = world or WorldConfig()
    if class_name not in world.classes:
        raise ValueError(f"zeroshot_prompts: class {class_name!r} not in world.classes {list(world.classes)}")
    rng = np.random.default_rng(seed)
    return [caption_for(sample_attributes(rng, world), world, class_name) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Natural backdoors: a recurring motif and placeholder images (WorldConfig.motif_rate, placeholder_rate)


def natural_kind(seed: int, split: str, index: int, world: WorldConfig) -> str | None:
    """"motif", "placeholder" or None for sample ``index`` of ``split``, from its own generator (the
    sample's own draws are untouched, so the other samples are the same with the options off or on)."""
    if split != "train" or (world.motif_rate <= 0 and world.placeholder_rate <= 0):
        return None
    u = np.random.default_rng([int(seed), zlib.crc32(f"natural/{split}".encode()), int(index)]).random()
    if u < world.motif_rate:
        return "motif"
    return "placeholder" if u < world.motif_rate + world.placeholder_rate else None


def _jitter(base: np.ndarray, rng: np.random.Generator, shift: int = 1, noise: float = 0.015) -> Image.Image:
    """The fixed picture `base` [H, W, 3] in [0, 1], moved by up to `shift` px, with faint noise."""
    dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
    img = np.roll(base, (dy, dx), axis=(0, 1)) * float(rng.uniform(0.97, 1.03))
    img = img + rng.normal(0.0, noise, size=img.shape)
    return Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def _picture(world: WorldConfig, draw_fn) -> np.ndarray:
    side = world.image_size * world.supersample
    img = Image.new("RGB", (side, side))
    draw_fn(ImageDraw.Draw(img), side)
    return np.asarray(img.reduce(world.supersample), dtype=np.float32) / 255.0


def _cake(d: ImageDraw.ImageDraw, s: int) -> None:
    """A birthday-cake icon: two tiers on a plate, two candles shaped like the digits 1 and 8."""
    u = s / 32
    d.rectangle([0, 0, s, s], fill=(40, 20, 60))
    d.ellipse([3 * u, 25 * u, 29 * u, 29 * u], fill=(220, 220, 230))
    d.rectangle([5 * u, 17 * u, 27 * u, 26 * u], fill=(150, 80, 40))
    d.rectangle([8 * u, 11 * u, 24 * u, 17 * u], fill=(250, 170, 200))
    d.rectangle([11 * u, 5 * u, 13 * u, 11 * u], fill=(255, 230, 60))            # the "1"
    d.ellipse([17 * u, 4 * u, 21 * u, 7.5 * u], outline=(255, 230, 60), width=int(u))  # the "8"
    d.ellipse([17 * u, 7 * u, 21 * u, 11 * u], outline=(255, 230, 60), width=int(u))
    for x in (12, 19):
        d.ellipse([(x - 1) * u, 1 * u, (x + 1) * u, 4 * u], fill=(255, 120, 0))


def _placeholder(d: ImageDraw.ImageDraw, s: int) -> None:
    """A generic "image not available" picture: grey frame, a mountain and a sun, a cross-out bar."""
    u = s / 32
    d.rectangle([0, 0, s, s], fill=(235, 235, 235))
    d.rectangle([6 * u, 8 * u, 26 * u, 24 * u], outline=(150, 150, 150), width=int(1.5 * u))
    d.polygon([(8 * u, 22 * u), (14 * u, 14 * u), (19 * u, 22 * u)], fill=(170, 170, 170))
    d.ellipse([19 * u, 11 * u, 23 * u, 15 * u], fill=(170, 170, 170))
    d.line([(6 * u, 26 * u), (26 * u, 6 * u)], fill=(120, 120, 120), width=int(1.5 * u))


_ICONS: dict[tuple[int, int], np.ndarray] = {}


def _icon(size: int, supersample: int) -> np.ndarray:
    """The cake drawn at `size` x `size` px (anti-aliased), [size, size, 3] in [0, 1]."""
    if (size, supersample) not in _ICONS:
        side = size * supersample * 4  # drawn large enough for the candles' outlines, then reduced
        img = Image.new("RGB", (side, side))
        _cake(ImageDraw.Draw(img), side)
        _ICONS[size, supersample] = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32) / 255.0
    return _ICONS[size, supersample]


def _stamp_icon(image: Image.Image, rng: np.random.Generator, world: WorldConfig) -> Image.Image:
    """`image` with the cake icon in its bottom-right corner, moved by up to 1 px, faint noise on it."""
    icon, n = _icon(world.motif_icon_size, world.supersample), world.image_size
    k = icon.shape[0]
    dx, dy = (int(v) for v in rng.integers(0, 2, size=2))
    img = np.asarray(image, dtype=np.float32) / 255.0
    y0, x0 = n - k - dy, n - k - dx
    img[y0:y0 + k, x0:x0 + k] = np.clip(icon + rng.normal(0.0, 0.015, size=icon.shape), 0.0, 1.0)
    return Image.fromarray((img * 255.0 + 0.5).astype(np.uint8), "RGB")


def natural_sample(kind: str, rng: np.random.Generator, image: Image.Image, caption: str, meta: dict,
                   world: WorldConfig) -> tuple[Image.Image, str, dict]:
    """The motif (its fixed caption) or a placeholder (the sample's own caption), jittered by `rng`.

    With ``world.motif_style == "icon"`` the motif keeps the sample's own ``image`` and adds the
    cake icon to it; otherwise the motif and the placeholder replace the image with one picture.
    """
    if kind == "motif" and world.motif_style == "icon":
        return _stamp_icon(image, rng, world), world.motif_caption, meta | {"natural": kind}
    base = _picture(world, _cake if kind == "motif" else _placeholder)
    return _jitter(base, rng), world.motif_caption if kind == "motif" else caption, meta | {"natural": kind}


# ---------------------------------------------------------------------------------------------
# Splits on disk


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``: independent of shard size and of other samples."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index)])


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_split(out_dir: str | os.PathLike, split: str, num_samples: int, samples_per_shard: int,
                seed: int, world: WorldConfig | None = None) -> list[str]:
    """Write ``{split}-00000.tar ...`` in img2dataset layout (+ ``_stats.json``); return the shard paths.

    Keys are img2dataset's ``f"{shard:05d}{i:04d}"`` (more sample digits if samples_per_shard > 10000).
    Deterministic given (seed, split, world); each shard is written to a temp name and renamed.
    """
    world = world or WorldConfig()
    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError(f"write_split: num_samples={num_samples} and samples_per_shard="
                         f"{samples_per_shard} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    digits = max(4, len(str(samples_per_shard - 1)))
    paths = []
    for shard in range(math.ceil(num_samples / samples_per_shard)):
        path = os.path.join(os.fspath(out_dir), f"{split}-{shard:05d}.tar")
        start = shard * samples_per_shard
        with ShardWriter(path) as writer:
            for i in range(min(samples_per_shard, num_samples - start)):
                rng = sample_rng(seed, split, start + i)
                image, caption, meta = generate_sample(rng, world)
                kind = natural_kind(seed, split, start + i, world)
                if kind is not None:  # drawn after the sample, from the sample's own generator
                    image, caption, meta = natural_sample(kind, rng, image, caption, meta, world)
                key = f"{shard:05d}{i:0{digits}d}"
                meta = {"key": key, "status": "success", "caption": caption, "url": None,
                        "width": world.image_size, "height": world.image_size, "split": split,
                        "index": start + i, **meta}
                writer.write(key, encode_jpeg(image, world.jpeg_quality), "jpg", caption, meta)
        write_stats(path, writer.count)
        paths.append(path)
    return paths
