"""The collectives of one MoCo v3 training step, per backend, from the model's own sharding units:
what each rank all-gathers, reduce-scatters and all-reduces (whole buffers: an all-gather's output,
a reduce-scatter's or an all-reduce's input; the padding and the precision policy's gather dtypes
included). `benchmarks.simulate` records the real ones at fake ranks and a test holds the two equal
byte for byte; `scale.train.timing` times them.

Per step with A micro-batches and V encoder calls per micro-batch (1 with joint views, 2 per view):

- FSDP2 (reshard after forward): every unit of the base encoder and the predictor gathered for each
  call's forward and again for its backward (2 V A; the encoder's own parameters V A + A), the
  momentum encoder's for each forward (V A);
  without resharding, the trained ones once per micro-batch. A unit that only feeds matmuls is
  gathered in bf16, every other one in fp32 (docs/training.md). Gradients reduce-scattered in fp32
  once per step (accumulated unsharded before the last micro-batch), one collective per trained
  unit. Each parameter is padded to a multiple of the world size on its first dimension.
- DDP: one all-reduce of the fp32 gradients per step, in buckets of 25 MiB after a first of 1 MiB
  (torch's rebuilt buckets from the second iteration on; the first iteration reduces one bucket).
- ZeRO-1/2/3 (DeepSpeed, analytic: `benchmarks/simulate.py` says why): the fp32 engine of the
  precision policy reduce-scatters fp32 gradients (ZeRO-2/3 every micro-batch, ZeRO-1 at the
  boundary) and all-gathers fp32 parameters: ZeRO-1/2 the updated ones once per step, ZeRO-3 as
  FSDP2 does (in fp32).
- Besides, on every backend with several ranks: the key gather (each of the two contrastive losses
  all-gathers the keys, (N B, dim) fp32) and the cross-rank BatchNorm (one all-reduce of fp64 sums,
  (rows, 2 C + 1), per call, and one more in the backward of a trained one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from scale.config import Config
from scale.models import MoCoV3
from scale.train.parallelize import build_model, layout_of, sharding_plan

DDP_BUCKET = 25 * 2**20
DDP_FIRST_BUCKET = 2**20
BACKENDS = ("ddp", "fsdp", "fsdp-noreshard", "hsdp", "hsdp-noreshard", "zero1", "zero2", "zero3")
"""The layouts the model knows: `parallel.backend` values, DeepSpeed by ZeRO stage, FSDP2 and HSDP
with and without resharding the base encoder after the forward."""

HSDP_OPS = ("shard_all_gather", "shard_reduce_scatter", "replica_all_reduce")
"""HSDP's collectives, apart from the world's (keys, BatchNorm): the gathers and reduce-scatters
inside a shard group, the all-reduce of each unit's reduced shard across the groups."""


def hsdp_shard(world: int, shard: int = 0, gpus_per_node: int = 8) -> int:
    """Ranks per HSDP shard group: `shard`, or one node's (`parallel.shard_size` 0)."""
    return min(world, shard or gpus_per_node)


@dataclass
class Traffic:
    """One kind of collective in a step: calls and their whole buffers, in bytes."""

    op: str
    calls: int
    bytes: float

    def add(self, calls: int, nbytes: float) -> None:
        self.calls += calls
        self.bytes += nbytes


@dataclass(frozen=True)
class Unit:
    """One FSDP2 sharding unit: the bytes of one gather of its own parameters and of its gradients'
    reduce-scatter (0 for the momentum encoder's)."""

    name: str
    gather: float
    scatter: float
    trained: bool
    block: int | None
    """The transformer block it belongs to (its index), None for an encoder's own parameters or the
    predictor: the timing model spreads the compute over the blocks."""
    encoder_root: bool = False
    """An encoder's own parameters (patch embedding, position, last norm, projector): with a
    forward per view its backward gathers them once per micro-batch, not once per view (autograd
    runs both views' heads first, then the blocks of each, and the patch embedding of both last:
    the unit stays gathered throughout; seen in the simulation)."""


def padded(p: nn.Parameter, world: int) -> int:
    """Elements of `p` as FSDP2 shards it: padded to a multiple of `world` on its first dimension."""
    rows = p.shape[0] if p.dim() else 1
    return math.ceil(rows / world) * world * (p.numel() // max(rows, 1))


def _own_params(unit: nn.Module, units: set[int]) -> list[nn.Parameter]:
    """The parameters of `unit` not held by a unit nested in it."""
    nested = [m for m in unit.modules() if m is not unit and id(m) in units]
    inner = {id(p) for m in nested for p in m.parameters()}
    return [p for p in unit.parameters() if id(p) not in inner]


def _blocks_and_trained(model: MoCoV3, layout) -> tuple[dict[int, int], set[int]]:
    """Each module's block index (by id, both encoders) and the ids of the trained modules."""
    block_of = {}
    for enc in (model.base_encoder, model.momentum_encoder):
        for i, block in enumerate(layout.blocks(enc)):
            block_of.update({id(m): i for m in block.modules()})
    return block_of, set(map(id, [*model.base_encoder.modules(), *model.predictor.modules()]))


def fsdp_units(model: MoCoV3, world: int, low_bytes: int, all_fp32: bool = False) -> list[Unit]:
    """The sharding units of `model` (`scale.train.parallelize.sharding_plan`) with their bytes on
    `world` ranks (`low_bytes`: per element of a matmul-only unit's gather; `all_fp32`: every
    gather in fp32, as DeepSpeed's fp32 engine does)."""
    plan = sharding_plan(model)
    ids = {id(u) for u in plan.units}
    low = {id(u) for u in plan.low_precision}
    layout = layout_of(model)
    block_of, trained = _blocks_and_trained(model, layout)
    names = {id(m): n for n, m in model.named_modules()}
    roots = {id(model.base_encoder), id(model.momentum_encoder)}
    out = []
    for unit in plan.units:
        params = _own_params(unit, ids)
        if not params:
            continue
        width = 4 if all_fp32 or id(unit) not in low else low_bytes
        grads = [p for p in params if p.requires_grad]
        out.append(Unit(names[id(unit)], sum(padded(p, world) for p in params) * width,
                        4.0 * sum(padded(p, world) for p in grads), id(unit) in trained, block_of.get(id(unit)),
                        id(unit) in roots))  # fmt: skip
    return out


def fsdp_traffic(units: list[Unit], views: int, accum: int = 1, reshard: bool = True,
                 scatter_every_micro_batch: bool = False) -> dict[str, Traffic]:  # fmt: skip
    """The parameter all-gathers and gradient reduce-scatters of one step over `units`."""
    gathers, scatters = Traffic("all_gather", 0, 0.0), Traffic("reduce_scatter", 0, 0.0)
    for u in units:
        backward = 1 if u.encoder_root else views
        times = ((views + backward) * accum if reshard else accum) if u.trained else views * accum
        gathers.add(times, times * u.gather)
        if u.trained:
            n = accum if scatter_every_micro_batch else 1
            scatters.add(n, n * u.scatter)
    return {"all_gather": gathers, "reduce_scatter": scatters}


def batchnorm_traffic(model: MoCoV3, accum: int = 1) -> Traffic:
    """The cross-rank BatchNorms' all-reduces of one step: a head's BatchNorm takes both views in one
    call (two rows) with joint views; per view (ViT-BN, the conv stem, a ResNet), every BatchNorm is
    called once per view with one row. The forward reduces each row's fp64 sums and count (2C + 1);
    a trained one reduces again in its backward the sums of dy and dy x xhat in fp32 (2C)."""
    out = Traffic("all_reduce", 0, 0.0)
    calls, rows = (1, 2) if model.joint_views else (2, 1)
    for part, trained in ((model.base_encoder, True), (model.predictor, True), (model.momentum_encoder, False)):
        for m in part.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = calls * accum
                out.add(n, n * rows * (2 * m.num_features + 1) * 8)
                if trained:
                    out.add(n, n * rows * 2 * m.num_features * 4)
    return out


def ddp_buckets(model: MoCoV3) -> list[float]:
    """Bytes of DDP's gradient buckets once rebuilt (from its second iteration on): the gradients in
    the order they become ready (the parameters' reverse order, as assumed here), a first bucket of
    1 MiB, then 25 MiB (torch's `_compute_bucket_assignment_by_size`, which DDP calls)."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad][::-1]
    buckets, _ = dist._compute_bucket_assignment_by_size(params, [DDP_FIRST_BUCKET, DDP_BUCKET], [False] * len(params))
    return [4.0 * sum(params[i].numel() for i in b) for b in buckets]


def zero3_units(model: MoCoV3, world: int, threshold: int) -> list[Unit]:
    """DeepSpeed ZeRO-3's gathers: one coalesced all-gather (fp32, each partition padded to the
    world size) per module holding parameters, of those above `threshold` elements
    (`stage3_param_persistence_threshold`: smaller ones stay whole on every rank)."""
    layout = layout_of(model)
    block_of, trained = _blocks_and_trained(model, layout)
    out = []
    for name, m in model.named_modules():
        params = [p for p in m.parameters(recurse=False) if p.numel() > threshold]
        if params:
            gather = 4.0 * sum(math.ceil(p.numel() / world) * world for p in params)
            scatter = 4.0 * sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
            out.append(Unit(name, gather, scatter, id(m) in trained, block_of.get(id(m))))
    return out


def zero_settings(stage: int) -> dict:
    """The `zero_optimization` section of `ds_configs/zero{stage}.json`, the DeepSpeed config a
    planned ZeRO layout runs with."""
    from scale.parallel.ds_config import bundled_config, load_ds_json, zero_section

    return zero_section(load_ds_json(bundled_config(stage)))


def key_gather_traffic(cfg: Config, batch: int, world: int, accum: int = 1) -> Traffic:
    """Each of the two contrastive losses of a micro-batch gathers the keys: (world x B, dim) fp32."""
    return Traffic("all_gather", 2 * accum, 2 * accum * world * batch * cfg.model.dim * 4)


def meta_model(cfg: Config) -> MoCoV3:
    with torch.device("meta"):
        return build_model(cfg)


def step_traffic(cfg: Config, backend: str, world: int, batch: int, accum: int = 1, precision: str = "bf16",
                 model: MoCoV3 | None = None, shard: int = 8) -> dict[str, Traffic]:  # fmt: skip
    """Every collective of one step on `world` ranks, by kind (`backend`: one of `BACKENDS`;
    `batch`: images per micro-batch and rank; `shard`: HSDP's group, whose collectives are keyed
    `HSDP_OPS`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown layout {backend!r}: one of {', '.join(BACKENDS)}")
    model = model if model is not None else meta_model(cfg)
    if world == 1:
        return {}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    views = 1 if model.joint_views else 2
    if backend.startswith("fsdp"):
        low = 2 if precision in ("bf16", "fp16") else 4
        out = fsdp_traffic(fsdp_units(model, world, low), views, accum, reshard=backend == "fsdp")
    elif backend.startswith("hsdp"):
        low = 2 if precision in ("bf16", "fp16") else 4
        g = hsdp_shard(world, shard)
        units = fsdp_units(model, g, low)
        inner = fsdp_traffic(units, views, accum, reshard=backend == "hsdp")
        out = {"shard_all_gather": inner["all_gather"], "shard_reduce_scatter": inner["reduce_scatter"]}
        if world > g:  # each unit's reduced shard, summed over the groups once per step
            trained = [u for u in units if u.trained and u.scatter]
            out["replica_all_reduce"] = Traffic("all_reduce", len(trained), sum(u.scatter for u in trained) / g)
    elif backend == "ddp":
        out = {"all_reduce": Traffic("all_reduce", len(ddp_buckets(model)), 4.0 * trainable)}
    else:  # DeepSpeed: its buckets and thresholds from ds_configs/zero{1,2,3}.json
        zero = zero_settings(int(backend[-1]))
        buckets = math.ceil(trainable / float(zero.get("reduce_bucket_size", 500_000_000)))
        n = 1 if backend == "zero1" else accum
        scatters = Traffic("reduce_scatter", n * buckets, n * 4.0 * trainable)
        if backend == "zero3":
            threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
            out = fsdp_traffic(zero3_units(model, world, threshold), views, accum)
            out["reduce_scatter"] = scatters
        else:
            gathers = math.ceil(trainable / float(zero.get("allgather_bucket_size", 500_000_000)))
            out = {"reduce_scatter": scatters, "all_gather": Traffic("all_gather", gathers, 4.0 * trainable)}
    keys = key_gather_traffic(cfg, batch, world, accum)
    out.setdefault("all_gather", Traffic("all_gather", 0, 0.0)).add(keys.calls, keys.bytes)
    bn = batchnorm_traffic(model, accum)
    if bn.calls:
        out.setdefault("all_reduce", Traffic("all_reduce", 0, 0.0)).add(bn.calls, bn.bytes)
    return out
