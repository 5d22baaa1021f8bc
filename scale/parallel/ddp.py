"""DistributedDataParallel: replicated model and optimizer, gradients all-reduced in buckets
overlapping the backward pass. Gloo on CPU, NCCL on GPU; launch with torchrun."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scale.parallel.base import Backend


class DDPBackend(Backend):
    name = "ddp"

    @classmethod
    def theory_bytes(
        cls, trainable: int, momentum: int, world_size: int, precision: str, accum_steps: int = 1, **_: Any
    ) -> dict[str, float]:
        """As one process; the gradients are views into DDP's buckets (`gradient_as_bucket_view`),
        except while accumulating: the accumulated gradients and the bucket are both alive in the
        last micro-batch."""
        out = super().theory_bytes(trainable, momentum, world_size, precision, accum_steps)
        if accum_steps > 1:
            out["grads"] = 8 * trainable
        return out

    def _wrap(self, module: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # BatchNorm statistics are synchronised by the cross-rank BatchNorm itself, so DDP need not
        # broadcast buffers every forward. Momentum-encoder parameters have requires_grad=False
        # and are left out of gradient buckets. Gradients are views into the communication buckets
        # (no second copy of them: 4 bytes per parameter less).
        with warnings.catch_warnings():
            # torch 2.14 deprecates broadcast_buffers in favour of forward_sync_buffers, which would
            # still sync at init; its own message says to keep broadcast_buffers=False until then.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DistributedDataParallel(
                module, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True
            )

    def _no_sync(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync()
