"""clipbd.inspect.decompose against a plain float64 re-implementation of the ViT forward that loops
over heads with the full attention matrix (the straightforward per-head decomposition), for the
default tiny ViT, ViT-B/32 and a layer-scale ViT, in both conventions."""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml

from clipbd.inspect import decompose
from clipbd.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _tiny_arch() -> dict:
    return yaml.safe_load((ROOT / "conf/model/tiny_vit.yaml").read_text())["arch"]


def _clip(arch: dict, seed: int = 0, **vision) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.CLIP(arch["embed_dim"], {**arch["vision_cfg"], **vision}, arch["text_cfg"])
    # open_clip initialises biases to 0 and LN gains to 1: randomise them so every allocation counts
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if p.ndim == 1 and "class_embedding" not in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _b32() -> torch.nn.Module:
    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    with torch.no_grad():
        for p in model.visual.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _images(model, n: int, seed: int = 0) -> torch.Tensor:
    size = model.visual.image_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _ln(x, m):
    return F.layer_norm(x, x.shape[-1:], m.weight, m.bias, m.eps)


def reference(model, images, convention="textbook"):
    """Plain float64 decomposition: the whole ViT forward by hand, one head at a time."""
    v = copy.deepcopy(model.visual).double()
    x = v.conv1(images.double()).flatten(2).transpose(1, 2)                         # [B, N-1, W]
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = _ln(x, v.ln_pre) if isinstance(v.ln_pre, torch.nn.LayerNorm) else x
    pre = x[:, 0]
    heads, mlps, biases = [], [], []
    for blk in v.transformer.resblocks:
        a = blk.attn
        W, H = x.shape[-1], a.num_heads
        dh = W // H
        g1 = blk.ls_1.gamma if hasattr(blk.ls_1, "gamma") else torch.ones(W, dtype=x.dtype)
        g2 = blk.ls_2.gamma if hasattr(blk.ls_2, "gamma") else torch.ones(W, dtype=x.dtype)
        h_in = _ln(x, blk.ln_1)
        q, k, val = (h_in @ a.in_proj_weight[i * W:(i + 1) * W].T + a.in_proj_bias[i * W:(i + 1) * W]
                     for i in range(3))
        attn_out = torch.zeros_like(x)
        layer_heads = []
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / dh ** 0.5, -1)  # [B, N, N]
            out_h = (att @ val[..., sl]) @ a.out_proj.weight[:, sl].T                     # [B, N, W]
            attn_out = attn_out + out_h
            layer_heads.append(out_h[:, 0] * g1)
        attn_out = attn_out + a.out_proj.bias
        x = x + attn_out * g1
        m_out = blk.mlp(_ln(x, blk.ln_2))
        x = x + m_out * g2
        heads.append(torch.stack(layer_heads, 1))
        mlps.append(m_out[:, 0] * g2)
        biases.append(a.out_proj.bias * g1)
    z = x[:, 0]
    heads, mlps, bias = torch.stack(heads, 1), torch.stack(mlps, 1), torch.stack(biases).sum(0)
    mu, sd = z.mean(-1, keepdim=True), (z.var(-1, unbiased=False, keepdim=True) + v.ln_post.eps).sqrt()
    gam, beta = v.ln_post.weight, v.ln_post.bias
    proj = v.proj if v.proj is not None else torch.eye(z.shape[-1], dtype=z.dtype)
    emb = (_ln(z, v.ln_post)) @ proj
    if convention == "textbook":
        P = lambda t: ((t - t.mean(-1, keepdim=True)) * gam / sd.view(-1, *[1] * (t.ndim - 2), 1)) @ proj  # noqa: E731
        return P(heads), P(mlps), P(pre + bias) + beta @ proj, emb
    L, H = heads.shape[1:3]
    T, norm = 2 * L + 1, emb.norm(dim=-1)
    out_h = torch.zeros(heads.shape[:3] + (proj.shape[1],), dtype=z.dtype)
    for b in range(z.shape[0]):
        f = lambda t, kk: ((t - mu[b] / kk) * gam / sd[b] + beta / kk) @ proj / norm[b]  # noqa: E731
        for li in range(L):
            for h in range(H):
                out_h[b, li, h] = f(heads[b, li, h] + biases[li] / H, T * H)
    f = lambda t: ((t - mu.view(-1, *[1] * (t.ndim - 2), 1) / T) * gam / sd.view(-1, *[1] * (t.ndim - 2), 1)  # noqa: E731
                   + beta / T) @ proj / norm.view(-1, *[1] * (t.ndim - 1))
    return out_h, f(mlps), f(pre), emb


def _check_oracle(model, images, convention="textbook"):
    d = decompose(copy.deepcopy(model).double(), images.double(), convention=convention)
    ref_h, ref_m, ref_r, emb = reference(model, images, convention)
    scale = emb.norm(dim=-1).max() if convention == "textbook" else 1.0
    for got, want in ((d.heads, ref_h), (d.mlps, ref_m), (d.rest, ref_r)):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-8 * scale
    return d


@pytest.mark.parametrize("convention", ["textbook", "faithful"])
def test_tiny_vit_matches_float64_oracle(convention):
    model = _clip(_tiny_arch())
    images = _images(model, 5)
    d = _check_oracle(model, images, convention)
    L, H = 4, 4
    assert d.heads.shape == (5, L, H, 64) and d.mlps.shape == (5, L, 64) and d.rest.shape == (5, 64)


def test_vit_b32_matches_float64_oracle():
    model = _b32()
    images = _images(model, 2)
    d = _check_oracle(model, images)
    assert d.heads.shape == (2, 12, 12, 512)


def test_layer_scale_vit_matches_oracle_both_conventions():
    model = _clip(_tiny_arch(), seed=3, ls_init_value=0.5)
    assert hasattr(model.visual.transformer.resblocks[0].ls_1, "gamma")
    images = _images(model, 3, seed=1)
    _check_oracle(model, images, "textbook")
    _check_oracle(model, images, "faithful")


@pytest.mark.parametrize("which", ["tiny", "b32", "layer_scale"])
def test_float32_sum_reproduces_encode_image(which):
    model = {"tiny": lambda: _clip(_tiny_arch()), "b32": _b32,
             "layer_scale": lambda: _clip(_tiny_arch(), ls_init_value=0.5)}[which]()
    images = _images(model, 4 if which != "b32" else 2, seed=2)
    emb = model.encode_image(images, normalize=False)
    d = decompose(model, images)
    assert d.heads.dtype == torch.float32
    rel = ((d.total() - emb).norm(dim=-1) / emb.norm(dim=-1)).max()
    assert rel <= 1e-5
    f = decompose(model, images, convention="faithful")
    unit = emb / emb.norm(dim=-1, keepdim=True)
    assert ((f.total() - unit).norm(dim=-1)).max() <= 1e-5
    # the conventions allocate differently (bias and the LN mean/shift), they are not one another
    assert (f.heads * emb.norm(dim=-1)[:, None, None, None] - d.heads).abs().max() > 1e-4


def test_proj_none_and_final_ln_after_pool_are_handled():
    model = _clip(_tiny_arch(), final_ln_after_pool=True)
    model.visual.proj = None
    images = _images(model, 3)
    emb = model.encode_image(images)
    d = decompose(model, images)
    assert d.rest.shape == (3, 128)
    assert torch.allclose(d.total(), emb, rtol=0, atol=1e-5 * emb.norm(dim=-1).max().item())


@pytest.mark.parametrize("setting,match", [({"pool_type": "avg"}, "pool_type='avg'"),
                                           ({"attentional_pool": True}, "attentional_pool"),
                                           ({"qk_norm": True}, "block 0")])
def test_unsupported_towers_are_refused_naming_the_setting(setting, match):
    model = _clip(_tiny_arch(), **setting)
    with pytest.raises(ConfigError, match=match):
        decompose(model, _images(model, 1))


def test_unknown_convention_is_refused():
    model = _clip(_tiny_arch())
    with pytest.raises(ConfigError, match="convention='paper'"):
        decompose(model, _images(model, 1), convention="paper")


def test_computed_in_the_model_dtype():
    model = _clip(_tiny_arch()).to(torch.bfloat16)
    images = _images(model, 3).to(torch.bfloat16)
    emb = model.encode_image(images).float()
    d = decompose(model, images)
    assert d.heads.dtype == d.mlps.dtype == d.rest.dtype == torch.bfloat16
    rel = ((d.total().float() - emb).norm(dim=-1) / emb.norm(dim=-1)).max()
    assert rel < 0.05  # bfloat16 rounding of 2L+1 terms, not an allocation error
