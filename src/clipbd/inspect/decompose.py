"""Decomposition of a ViT CLIP image embedding into heads, MLPs and the rest (He et al., ICML 2025,
on the TextSpan decomposition of Gandelsman et al., ICLR 2024, §3).

The class token's residual stream after the last block is a sum of pieces (pre-norm ViT):

    z = ln_pre(x)_cls + Σ_l [ ls_1 · (Σ_h W_O^{l,h} Σ_i α^{l,h}_{cls,i} v^{l,h}_i + b_O^l) + ls_2 · mlp_l(·)_cls ]

and `embedding = ln_post(z) @ proj`. `ln_post` is linear once its standard deviation σ is fixed at
the image's own value, so every piece t maps to `((t - mean(t)) · γ/σ) @ proj` (centring is linear,
so centring each piece over its features is exact), and the shift β goes to `rest`. Only the class
token's attention row is formed: the per-head output is `Σ_i α_{cls,i} v_i` through that head's
columns of the out-projection — no `[B, N, N, H, D]` tensor.

Two allocations (`convention=`):
  textbook  heads[b,l,h] = P(ls_1 · W_O^{l,h} Σ_i α v), mlps[b,l] = P(ls_2 · mlp_l), rest[b] =
            P(ln_pre_cls + Σ_l ls_1 · b_O^l) + β @ proj, with P(t) = ((t - mean_f t) · γ/σ) @ proj;
            heads.sum((1,2)) + mlps.sum(1) + rest == encode_image(images, normalize=False).
  faithful  the published code's (TextSpan `prs_hook.py`, kept by He et al.): the out-projection
            bias split evenly over tokens × heads (b_O/H per head once summed over tokens), the
            post-LN mean μ and shift β split evenly over the T = 2L+1 pieces (heads take 1/(T·H)
            each), `P_k(t) = ((t - μ/k) · γ/σ + β/k) @ proj` with k = T·H for a head and T for an MLP
            or the ln_pre term, and every piece divided by ‖encode_image(images)‖; `rest` is the
            ln_pre term alone; the pieces sum to encode_image / ‖encode_image‖.
Layer scale (`ls_1`, `ls_2`) multiplies a block's attention (bias included) and MLP outputs in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clipbd.registry import ConfigError

CONVENTIONS = ("textbook", "faithful")


@dataclass
class Decomposition:
    """heads [B, L, H, D], mlps [B, L, D], rest [B, D] (D: the joint embedding width), and the
    embedding of the same forward pass, encode_image(images, normalize=False) [B, D]."""

    heads: torch.Tensor
    mlps: torch.Tensor
    rest: torch.Tensor
    embedding: torch.Tensor
    convention: str = "textbook"

    def total(self) -> torch.Tensor:
        """The re-summed embedding [B, D] (textbook: the embedding; faithful: it over its norm)."""
        return self.heads.sum((1, 2)) + self.mlps.sum(1) + self.rest


def _check_visual(model: nn.Module) -> nn.Module:
    """The image tower, if this decomposition applies to it; else a one-line error naming the setting."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise ConfigError(f"decompose: the image tower is a {type(visual).__name__}, not an open_clip "
                          f"VisionTransformer; use a ViT model (e.g. model.name=ViT-B-32)")
    if visual.attn_pool is not None:
        raise ConfigError("decompose: vision_cfg.attentional_pool is set (attn_pool): the attentional "
                          "pooler mixes all tokens after ln_post; use a class-token ViT (attentional_pool=false)")
    if visual.pool_type != "tok":
        raise ConfigError(f"decompose: vision_cfg.pool_type={visual.pool_type!r}: only class-token pooling "
                          f"('tok') is decomposed")
    for i, blk in enumerate(visual.transformer.resblocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or hasattr(blk, "ln_1_kv"):
            raise ConfigError(f"decompose: block {i} is a {type(blk).__name__} with {type(attn).__name__} "
                              f"attention; only nn.MultiheadAttention self-attention blocks are decomposed "
                              f"(vision_cfg block_type=default, no qk_norm/scale_* options)")
    return visual


def _gamma(ls: nn.Module) -> torch.Tensor | float:
    return ls.gamma if hasattr(ls, "gamma") else 1.0


def _cls_heads(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-head class-token outputs [B, H, W] of attention `attn` on its input x = ln_1(z) [B, N, W],
    before the out-projection bias: W_O^h Σ_i α_{cls,i}^h v_i^h (q/k/v from in_proj, as MHA does)."""
    B, N, W = x.shape
    H = attn.num_heads
    dh = W // H
    w, b = attn.in_proj_weight, attn.in_proj_bias
    bq, bkv = (None, None) if b is None else (b[:W], b[W:])
    q = nn.functional.linear(x[:, 0], w[:W], bq).view(B, H, dh)              # [B, H, dh]
    k, v = nn.functional.linear(x, w[W:], bkv).view(B, N, 2, H, dh).unbind(2)  # [B, N, H, dh] each
    alpha = torch.einsum("bhd,bnhd->bhn", q, k).mul_(dh ** -0.5).softmax(-1)  # [B, H, N]
    o = torch.einsum("bhn,bnhd->bhd", alpha, v)                               # [B, H, dh]
    return torch.einsum("bhd,whd->bhw", o, attn.out_proj.weight.view(W, H, dh))  # [B, H, W]


@torch.no_grad()
def decompose(model: nn.Module, images: torch.Tensor, *, convention: str = "textbook") -> Decomposition:
    """Decompose `model.encode_image(images, normalize=False)` (module docstring).

    model: an open_clip CLIP (or its `.visual`) whose image tower is a class-token
    `VisionTransformer` with `nn.MultiheadAttention` blocks; images: normalised [B, 3, H, W].
    Returns heads [B, L, H, D], mlps [B, L, D], rest [B, D] in the model's dtype. One forward pass
    with hooks on each block's `attn` (input ln_1(z)) and `mlp`; open_clip is not patched.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"decompose: convention={convention!r}; valid: {', '.join(CONVENTIONS)}")
    visual = _check_visual(model)
    blocks = visual.transformer.resblocks
    pieces: dict[str, list] = {"heads": [], "mlps": [], "bias": [], "pre": [], "z": []}

    def tok_first(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:  # [B, N, W] whatever the layout
        return x if blk.attn.batch_first else x.transpose(0, 1)

    hooks = [visual.ln_pre.register_forward_hook(lambda m, a, out: pieces["pre"].append(out[:, 0])),
             visual.ln_post.register_forward_pre_hook(
                 lambda m, a: pieces["z"].append(a[0][:, 0] if a[0].ndim == 3 else a[0]))]
    for blk in blocks:
        def on_attn(m, args, blk=blk):
            g = _gamma(blk.ls_1)
            pieces["heads"].append(_cls_heads(m, tok_first(blk, args[0])) * g)
            bias = m.out_proj.bias if m.out_proj.bias is not None else torch.zeros_like(m.out_proj.weight[0])
            pieces["bias"].append(bias * g)

        def on_mlp(m, args, out, blk=blk):
            pieces["mlps"].append(tok_first(blk, out)[:, 0] * _gamma(blk.ls_2))

        hooks += [blk.attn.register_forward_pre_hook(on_attn), blk.mlp.register_forward_hook(on_mlp)]
    try:
        embedding = visual(images)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(embedding, tuple):  # output_tokens=True
        embedding = embedding[0]
    heads = torch.stack(pieces["heads"], 1)  # [B, L, H, W]
    mlps = torch.stack(pieces["mlps"], 1)    # [B, L, W]
    bias = torch.stack(pieces["bias"], 0)    # [L, W]
    pre, z = pieces["pre"][0], pieces["z"][0]  # [B, W]
    ln = visual.ln_post
    sigma = (z.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()  # [B, 1]
    gamma = ln.weight if ln.weight is not None else torch.ones_like(z[0])
    beta = ln.bias if ln.bias is not None else torch.zeros_like(z[0])
    proj = visual.proj if visual.proj is not None else torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    s = gamma / sigma  # [B, W]

    def scale(t: torch.Tensor) -> torch.Tensor:  # t [B, ..., W] -> t · γ/σ of its own image
        return t * s.view(s.shape[0], *([1] * (t.ndim - 2)), -1)

    if convention == "textbook":
        centre = lambda t: t - t.mean(-1, keepdim=True)  # noqa: E731
        heads_o = scale(centre(heads)) @ proj
        mlps_o = scale(centre(mlps)) @ proj
        rest_o = scale(centre(pre + bias.sum(0))) @ proj + beta @ proj
    else:
        L, H = heads.shape[1], heads.shape[2]
        T = 2 * L + 1
        mu = z.mean(-1, keepdim=True)  # [B, 1]
        norm = embedding.norm(dim=-1, keepdim=True)  # [B, 1]

        def piece(t: torch.Tensor, k: int) -> torch.Tensor:
            shape = (t.shape[0], *([1] * (t.ndim - 2)), -1)
            return (scale(t - (mu / k).view(shape)) + beta / k) @ proj / norm.view(shape)

        heads_o = piece(heads + (bias / H)[None, :, None], T * H)
        mlps_o = piece(mlps, T)
        rest_o = piece(pre, T)
    return Decomposition(heads=heads_o, mlps=mlps_o, rest=rest_o, embedding=embedding, convention=convention)
