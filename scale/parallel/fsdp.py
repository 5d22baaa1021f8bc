"""PyTorch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over all ranks.

Applied from outside the model, following a `ShardingPlan`: every unit (each transformer block of
both encoders, its normalisation layers as units of their own, then each encoder and the
predictor), then the root. The momentum encoder is sharded with exactly the base encoder's layout,
so its EMA runs on the local shards with no communication (`momentum_update`). Parameters stay fp32
(the sharded masters, EMA included). In bf16 the precision policy of docs/training.md holds as on
one process: autocast computes, the plan's matmul-only units are gathered in bf16 (what autocast
would cast them to) with their fp32 inputs passed on unchanged, every other unit in fp32, and
gradients are reduced in fp32.

`parallel.reshard_after_forward` (the base encoder's units): true frees gathered parameters after
each unit's forward and gathers them again for backward (ZeRO-3-like, least memory); false keeps
them until backward (ZeRO-2-like, less communication). The momentum encoder's units never run a
backward: they always free them after their forward (`ShardingPlan.forward_only`). Each block
prefetches the next block's gathers in the forward and the previous block's in the backward
(`set_modules_to_forward_prefetch` / `..._backward_prefetch`), so a gather is in flight while the
block before it computes.

HSDP (`HSDPBackend`, `--parallel.backend=hsdp`): a 2-D device mesh (replicate x shard): every unit is
sharded inside groups of `parallel.shard_size` ranks (0: one node's) and replicated across them. The
gathers and reduce-scatters stay inside a group (NVLink: latency (g-1) hops, not (N-1)); the
gradients' shards are then all-reduced across the groups. The momentum update runs on local shards
as under FSDP2; the gradient norm sums the squares of one group's shards.

Checkpoints: torch.distributed.checkpoint (sharded files, every rank writes its part). A checkpoint
resumes on the same world size, and DCP reshards it for another one (tested: 2 ranks -> 1 rank from
an epoch-end checkpoint gives the same losses; mid-epoch the data position needs the same layout).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from scale.errors import BackendError
from scale.parallel.base import Backend
from scale.parallel.memory import state_bytes
from scale.safe_load import dcp_load_safely, load_safely

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, precision: str = "auto", device: torch.device | None = None, mesh: DeviceMesh | None = None):
        super().__init__(precision, device)
        self.mesh = mesh
        """The device mesh to shard over (None: FSDP2's default, every rank of the default group). A
        simulated run (`benchmarks.simulate`) makes it before its fake tensors exist."""

    def _wrap(self, module: nn.Module) -> nn.Module:
        # The precision policy (docs/training.md): autocast computes as on one process; the units that
        # only feed matmuls are gathered in the compute dtype (what autocast casts them to anyway: half
        # the bytes), their fp32 inputs passed on unchanged; every other unit in fp32; fp32 reductions.
        low = self.autocast_dtype
        full = MixedPrecisionPolicy(reduce_dtype=torch.float32 if low else None)
        matmuls = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False)
        low_units = {id(u) for u in self.plan.low_precision} if low else set()
        forward_only = {id(u) for u in self.plan.forward_only}
        reshard = self.settings.reshard_after_forward
        mesh = self._mesh()
        for unit in self.plan.units:
            policy = matmuls if id(unit) in low_units else full
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard or id(unit) in forward_only, mp_policy=policy)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard, mp_policy=full)
        for unit, method in self.plan.forward_methods:
            register_fsdp_forward_method(unit, method)
        for sequence in self.plan.sequences:  # explicit prefetch: the next block ahead, both ways
            for i, group in enumerate(sequence):
                if i + 1 < len(sequence):
                    group[0].set_modules_to_forward_prefetch(sequence[i + 1])
                if i > 0:
                    group[0].set_modules_to_backward_prefetch(sequence[i - 1])
        low_name = str(low).removeprefix("torch.") if low else "fp32"
        if self.is_main:
            log.info("%s: %d units + root, base encoder reshard_after_forward=%s (momentum encoder: always), %d "
                     "gathered in %s, the rest in fp32; the next block prefetched", self._describe_mesh(mesh),
                     len(self.plan.units), reshard, len(low_units), low_name)  # fmt: skip
        return module

    def _mesh(self) -> DeviceMesh | None:
        """The device mesh to shard over: the given one, or FSDP2's default (every rank)."""
        return self.mesh

    def _describe_mesh(self, mesh: DeviceMesh | None) -> str:
        return "FSDP2" if mesh is None or mesh.ndim == 1 else f"HSDP {tuple(mesh.shape)} (replicate x shard)"

    @contextlib.contextmanager
    def _no_sync(self):
        """Accumulate gradients locally on micro-batches before the last (no reduce-scatter)."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's shards: both encoders share one layout, so the EMA needs no communication."""
        ks, qs = self.module.momentum_pairs()
        return [_local(k) for k in ks], [_local(q) for q in qs]

    def _reduce_group_squares(self, squares: torch.Tensor) -> torch.Tensor:
        """Every gradient is sharded over all ranks (Shard(0)): the squares of the shards add up."""
        return self._sum_over_ranks(squares)

    def shard_ranks(self, shard_size: int = 0) -> int:
        """Ranks each parameter is sharded over."""
        return self.world_size

    def _total_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The norm over the sharded gradients is a partial DTensor: reduced to the whole one (a
        collective, not a host sync), the same on every rank."""
        norm = super()._total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self.module),
            "optimizer": get_optimizer_state_dict(self.module, self.optimizer),
        }

    def save(self, directory: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(directory / "dcp"))
        if self.is_main and self.scaler:
            torch.save(self.scaler.state_dict(), directory / "scaler.pt")

    def load(self, directory: Path) -> None:
        state = self._state()
        # DCP unpickles its metadata and non-tensor entries: checked first, so nothing in them can run.
        dcp_load_safely(lambda **kw: dcp.load(state, **kw), directory / "dcp", DefaultLoadPlanner)
        set_model_state_dict(self.module, state["model"])
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"])
        if self.scaler and (directory / "scaler.pt").is_file():
            self.scaler.load_state_dict(load_safely(directory / "scaler.pt"))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.module, options=options)  # complete on rank 0 only
        return self.broadcast_object(full)

    def local_numel(self, module: nn.Module) -> int:
        """Elements of `module`'s parameters held by this rank."""
        return sum(_local(p).numel() for p in module.parameters())


class HSDPBackend(FSDPBackend):
    """FSDP2 on a 2-D mesh (the module docstring): sharded inside groups of `shard_size` ranks,
    replicated across them."""

    name = "hsdp"

    def _mesh(self) -> DeviceMesh:
        if self.mesh is not None:
            return self.mesh
        from torch.distributed.device_mesh import init_device_mesh

        shard = self.shard_ranks()
        if shard < 1 or self.world_size % shard:
            raise BackendError(f"HSDP: a shard group of {shard} ranks does not divide the {self.world_size} ranks; "
                               "set --parallel.shard_size to a divisor (0: the ranks of one node)")  # fmt: skip
        device = "cuda" if self.device.type == "cuda" else "cpu"
        self.mesh = init_device_mesh(device, (self.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))
        return self.mesh

    def shard_ranks(self, shard_size: int = 0) -> int:
        """Ranks of a shard group: the mesh's, else `shard_size` or the setting (0: one node's)."""
        import os

        if self.mesh is not None:
            return self.mesh.size(-1)
        return shard_size or self.settings.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    def state_bytes(self, trainable: int, momentum: int, accum_steps: int = 1, shard_size: int = 0) -> dict[str, float]:
        return state_bytes("hsdp", trainable, momentum, self.shard_ranks(shard_size), self.precision, accum_steps)

    def _reduce_group_squares(self, squares: torch.Tensor) -> torch.Tensor:
        """Sharded inside a group, replicated across: one group's shards make every gradient once."""
        if self.mesh is None or self.mesh.ndim == 1:
            return super()._reduce_group_squares(squares)
        out = squares.to(self.comm_device())
        torch.distributed.all_reduce(out, group=self.mesh.get_group("shard"))
        return out.to(squares.device)
