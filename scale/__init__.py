"""scale: MoCo v3 self-supervised Vision Transformer pretraining, from one CPU to GPU clusters."""

__version__ = "0.1.0"
