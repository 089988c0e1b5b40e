"""Encoder-level analyses: the decomposition of a ViT CLIP image embedding (He et al., ICML 2025)
and what is built on it (clipbd.inspect.heads)."""

from clipbd.inspect.decompose import CONVENTIONS, Decomposition, decompose

__all__ = ["CONVENTIONS", "Decomposition", "decompose"]
