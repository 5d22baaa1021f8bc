"""What the machine can do and how a run uses it: the training precision resolved for a device
(with the CPU's bf16 capability measured), TF32, the device's peak FLOP/s for MFU and its peak
memory, and the CPU allocator tuned for training. No parallelism, no model.

This face is torch-free (the config reads it before torch is imported); its modules import torch."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""`parallel.precision` values; resolved for a device by `scale.hardware.precision.resolve_precision`."""
