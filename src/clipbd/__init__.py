"""clipbd: backdoor research pipeline for CLIP (poison -> pretrain -> extract -> reduce -> evaluate)."""

__version__ = "0.1.0"
