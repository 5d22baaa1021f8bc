"""What a backend is given besides the model: typed settings (never the run's whole config) and the
sharding plan of the model (given by whoever knows the model: `scale.train.parallelize`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class BackendSettings:
    """The run's values a backend needs to set itself up (`Backend.setup`)."""

    global_batch_size: int = 1
    batch_size_per_device: int = 1
    grad_accum_steps: int = 1
    clip_grad: float = 0.0
    """The global gradient norm's clipping threshold (0: none); DeepSpeed clips inside its engine."""
    optimizer: str = "adamw"
    """The optimizer's name: DeepSpeed ZeRO refuses the per-tensor trust ratios of LAMB and LARS."""
    reshard_after_forward: bool = True
    """FSDP2: free the base encoder's gathered parameters after each unit's forward."""
    shard_size: int = 0
    """HSDP: ranks per shard group (0: the ranks of one node)."""


@dataclass
class ShardingPlan:
    """How to shard a model, given by whoever knows the model.

    units: modules to shard one by one, innermost first (e.g. every transformer block of both
        encoders, then the encoders); the root is sharded last by the backend.
    low_precision: the units whose parameters are used only by matmuls (and the biases they add):
        a sharded backend may gather them in the compute dtype (bf16), which is what autocast casts
        them to anyway, and must pass their fp32 inputs on unchanged (the residual stream). Every
        other unit (normalisations, tables, heads with BatchNorm) is gathered in fp32.
    forward_methods: (module, method name) pairs called from outside besides `forward` (e.g. an
        encoder's `pooled_features` for evaluation), so sharded backends gather parameters for them.
    forward_only: the units that never run a backward (the momentum encoder's): a sharded backend
        frees their gathered parameters right after their forward, whatever it does for the others.
    sequences: each encoder's repeated units in call order, as lists of modules to gather together
        (a block with its normalisation units): a sharded backend may prefetch the next one in the
        forward and the previous one in the backward.
    """

    units: list[nn.Module] = field(default_factory=list)
    low_precision: list[nn.Module] = field(default_factory=list)
    forward_methods: list[tuple[nn.Module, str]] = field(default_factory=list)
    forward_only: list[nn.Module] = field(default_factory=list)
    sequences: list[list[list[nn.Module]]] = field(default_factory=list)
