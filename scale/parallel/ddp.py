"""DistributedDataParallel: replicated model and optimizer, gradients all-reduced in buckets
overlapping the backward pass. Gloo on CPU, NCCL on GPU; launch with torchrun."""

from __future__ import annotations

import contextlib
import warnings

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scale.parallel.base import Backend


class DDPBackend(Backend):
    name = "ddp"

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
