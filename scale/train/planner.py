"""The layout of a run on N GPUs: every candidate (backend, ZeRO stage or FSDP2 with or without
resharding, activation checkpointing, micro-batch and so gradient accumulation) with its memory per
GPU, whether it fits and why not, its projected step time (`scale.train.timing`) and images/s; the
fastest that fits with a margin. `python -m benchmarks.plan` prints the table;
`--parallel.backend=auto` runs the same choice at start-up over the backends alone (the run's own
batch split and recompute setting are kept) and logs it with the runner-up.

Memory per GPU = the model state (`scale.parallel.memory`, DeepSpeed's persistent buckets from
ds_configs/) + the activations of one micro-batch (`scale.train.memory.activation_bytes`, and
autocast's bf16 weight copies where the weights are fp32: every backend but FSDP2) + the
transient buffers of the layout: FSDP2 twice its largest gather (a block, or the encoder's own
unit with the projector: one computed, one prefetched) and its largest unsharded fp32 gradients,
without resharding the whole base encoder gathered from its forward to its backward, and the
model's padding to a multiple of N, twice in bf16; ZeRO-3 its prefetch bucket and one module's fp32
gradients; ZeRO-1/2 DeepSpeed's reduce (two with overlap_comm) and all-gather buckets in fp32.
A layout fits when that is at most `headroom` of the GPU's memory less `reserve_gib` (the CUDA
context, cuBLAS/NCCL workspaces, allocator fragmentation).

A layout with gradient accumulation changes MoCo v3's loss (each loss contrasts micro-batch x N
keys, not the global batch): the planner takes one only when nothing without fits.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from scale.config import Config, split_batch
from scale.errors import BackendError
from scale.models import MoCoV3
from scale.parallel.ds_config import bundled_config, load_ds_json, zero_section
from scale.parallel.memory import state_bytes, zero_persistent_buffer_bytes
from scale.parallel.recompute import recompute_mode
from scale.train.memory import activation_bytes, autocast_copy_bytes
from scale.train.timing import GPUS, Cluster, Layout, StepTime, step_time
from scale.train.traffic import BACKENDS, fsdp_units, hsdp_shard, meta_model, padded, zero3_units

log = logging.getLogger(__name__)

GIB = 2**30
HEADROOM = 0.9
RESERVE_GIB = 2.0


@dataclass
class Candidate:
    layout: Layout
    memory: dict[str, float]
    """Bytes per GPU: state, activations, transient, total."""
    limit: float
    """Bytes a layout may use on this GPU."""
    time: StepTime
    global_batch: int

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.limit

    @property
    def images_per_s(self) -> float:
        return self.global_batch / self.time.step

    def why_not(self) -> str:
        if self.fits:
            return ""
        return (f"needs {self.memory['total'] / GIB:.1f} GiB > {self.limit / GIB:.1f} GiB usable "
                f"(state {self.memory['state'] / GIB:.1f} + activations {self.memory['activations'] / GIB:.1f} "
                f"+ transient {self.memory['transient'] / GIB:.1f})")  # fmt: skip

    def rank_key(self) -> tuple:
        """Fitting first, then without accumulation, then the faster (to 0.1 ms), then without
        recompute (the same time with fewer FLOPs: its comm was hidden), then the smaller."""
        return (not self.fits, self.layout.accum > 1, round(self.time.step, 4), self.recompute_cost,
                self.memory["total"])  # fmt: skip

    @property
    def recompute_cost(self) -> int:
        """0 without recompute, 1 selective, 2 every block."""
        return ("none", "selective", "full").index(recompute_mode(self.layout.activation_checkpointing))


def _memory_kind(backend: str) -> tuple[str, int]:
    """(`scale.parallel.memory` kind, ZeRO stage) of a layout's backend."""
    if backend.startswith("zero"):
        return "deepspeed", int(backend[-1])
    return backend.split("-")[0], 0


def layout_memory(model: MoCoV3, layout: Layout, world: int, precision: str = "bf16",
                  shard: int = 8) -> dict[str, float]:  # fmt: skip
    """Bytes per GPU of `layout` for `model` (on meta) on `world` GPUs (module docstring; `shard`:
    HSDP's group, sharded inside it as FSDP2 on that many GPUs)."""
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    M = sum(p.numel() for p in model.momentum_encoder.parameters())
    A = layout.accum
    kind, stage = _memory_kind(layout.backend)
    transient = 0.0
    buffers = 0.0
    if kind == "hsdp":  # sharded inside a group of `shard` GPUs as FSDP2 on that many
        world, kind = hsdp_shard(world, shard), "fsdp"
    if kind == "deepspeed":
        ds = load_ds_json(bundled_config(stage))
        zero = zero_section(ds)
        buffers = zero_persistent_buffer_bytes(ds, precision, A)
        if stage == 3:
            units = zero3_units(model, world, int(zero.get("stage3_param_persistence_threshold", 100_000)))
            biggest = max((u.scatter for u in units), default=0.0)
            transient = 4.0 * float(zero.get("stage3_prefetch_bucket_size", 50_000_000)) + biggest
        else:
            reduce = 4.0 * float(zero.get("reduce_bucket_size", 500_000_000)) * (2 if zero.get("overlap_comm") else 1)
            transient = min(reduce, 8.0 * P) + min(4.0 * float(zero.get("allgather_bucket_size", 500_000_000)), 4.0 * P)
    elif kind == "fsdp" and world > 1:
        low = 2 if precision in ("bf16", "fp16") else 4
        units = fsdp_units(model, 1, low)  # world 1: whole (unsharded) sizes
        gathered: dict[tuple[bool, int | str], float] = {}  # per block, and each unit outside the blocks
        for u in units:
            key = (u.trained, u.block if u.block is not None else u.name)
            gathered[key] = gathered.get(key, 0.0) + u.gather
        biggest = max(gathered.values(), default=0.0)
        grads = max((u.scatter for u in units if u.trained), default=0.0)
        # Past ~128 ranks the simulated peak grows by 1.2-1.6x the model's padding to a multiple of N
        # in bf16 (FSDP2 pads each parameter's first dimension; docs/scaling.md): counted as 2x.
        pad = sum(padded(p, world) - p.numel() for p in model.parameters())
        transient = 2 * biggest + grads + 4 * pad
        if layout.backend.endswith("-noreshard"):
            transient += sum(u.gather for u in units if u.trained)
    state = state_bytes(kind, P, M, world, precision, A, stage, buffers)
    ac = layout.activation_checkpointing
    acts = activation_bytes(model.base_encoder.cfg, layout.micro_batch, precision, ac)
    acts += autocast_copy_bytes(P, precision, ac, casts=kind != "fsdp")
    total = sum(state.values()) + acts + transient
    return {"state": sum(state.values()), "activations": acts, "transient": transient, "total": total}


def candidates(cfg: Config, cluster: Cluster, backends: tuple[str, ...] = BACKENDS,
               recompute: tuple[bool | str, ...] = (False, "selective", True),
               micro_batches: tuple[int, ...] | None = None,
               model: MoCoV3 | None = None, headroom: float = HEADROOM,
               reserve_gib: float = RESERVE_GIB) -> list[Candidate]:  # fmt: skip
    """Every layout of `cfg`'s model at its global batch on `cluster`, best first (`rank_key`)."""
    N, B = cluster.gpus, cfg.batch.global_batch_size
    if B % N:
        raise BackendError(f"the global batch {B} does not split over {N} GPUs: choose a GPU count that divides it "
                           "or change --batch.global_batch_size")  # fmt: skip
    per_gpu = B // N
    model = model if model is not None else meta_model(cfg)
    if micro_batches is None:
        micro_batches = tuple(m for m in _halvings(per_gpu))
    limit = headroom * cluster.memory_bytes - reserve_gib * GIB
    out = []
    for backend in backends:
        if N == 1 and backend != "ddp":
            continue  # one GPU: nothing to shard (ddp stands for the single process)
        if backend.startswith("hsdp") and cluster.gpus_per_node >= N:
            continue  # one node: HSDP is FSDP2
        if backend.startswith("zero") and cfg.optim.name != "adamw":
            continue  # ZeRO's flattened partitions refuse LAMB's and LARS's per-tensor trust ratios
        for ac in recompute:
            if ac == "selective" and backend.startswith(("fsdp", "hsdp", "zero3")):
                continue  # not under the sharded backends' per-block gathers (`selective_recompute_problem`)
            for m in micro_batches:
                layout = Layout(backend, ac, per_gpu, m)
                mem = layout_memory(model, layout, N, "bf16", shard=cluster.gpus_per_node)
                out.append(Candidate(layout, mem, limit, step_time(model, cfg, layout, cluster), B))
    return sorted(out, key=Candidate.rank_key)


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] % 2 == 0 and out[-1] > 1:
        out.append(out[-1] // 2)
    return out


SIMPLER = ("ddp", "zero1", "zero2", "fsdp-noreshard", "hsdp-noreshard", "hsdp", "fsdp", "zero3")
"""Backends from the simplest (fewest collectives, whole checkpoints) to the most sharded."""
TOLERANCE = 0.02
"""Layouts within 2% of the fastest are equal to the time model: the simplest of them is chosen."""


def best_and_runner_up(ranked: list[Candidate]) -> tuple[Candidate | None, Candidate | None]:
    """The layout to run: of those that fit (without gradient accumulation when any does), the
    simplest backend (`SIMPLER`) within `TOLERANCE` of the fastest, without recompute when that is
    as fast; and the best that fits with another backend."""
    fitting = [c for c in ranked if c.fits]
    if not fitting:
        return None, None
    pool = [c for c in fitting if c.layout.accum == 1] or fitting
    fastest = min(c.time.step for c in pool)
    near = [c for c in pool if c.time.step <= fastest * (1 + TOLERANCE)]
    best = min(near, key=lambda c: (SIMPLER.index(c.layout.backend), c.recompute_cost, c.time.step))
    other = next((c for c in fitting if c.layout.backend != best.layout.backend), None)
    return best, other


def describe(c: Candidate) -> str:
    return (f"{c.layout.describe()}: {c.time.step * 1e3:.0f} ms/step, {c.images_per_s:,.0f} img/s, "
            f"{c.memory['total'] / GIB:.1f} GiB/GPU")  # fmt: skip


@dataclass(frozen=True)
class AutoChoice:
    backend: str
    """A `parallel.backend` value: ddp, fsdp or deepspeed."""
    deepspeed_config: str
    line: str
    """The one log line: the choice, the runner-up."""


def choose_backend(cfg: Config, world: int, memory_bytes: float, gpus_per_node: int, per_device: int,
                   deepspeed: bool = True, gpu: str = "H100") -> AutoChoice:  # fmt: skip
    """`--parallel.backend=auto` on `world` GPUs of `memory_bytes`: the fastest backend that fits
    the run's own batch split (`per_device` images per micro-batch, `batch.grad_accum_steps`) and
    recompute setting (DeepSpeed's ZeRO stages only when `deepspeed` is importable).

    Raises:
        BackendError: no backend fits; names what to change.
    """
    reshard = cfg.parallel.reshard_after_forward
    suffix = "" if reshard else "-noreshard"
    backends = ("ddp", f"fsdp{suffix}", f"hsdp{suffix}", *(("zero1", "zero2", "zero3") if deepspeed else ()))
    cluster = Cluster(world, gpus_per_node=gpus_per_node, gpu=gpu, memory_gib=memory_bytes / GIB)
    accum = cfg.batch.grad_accum_steps
    planned = replace(cfg.batch, global_batch_size=per_device * accum * world)
    plan_cfg = replace(cfg, batch=planned)
    ranked = candidates(plan_cfg, cluster, backends, (cfg.parallel.activation_checkpointing,), (per_device,))
    best, runner = best_and_runner_up(ranked)
    note = "" if deepspeed else " (DeepSpeed not installed: ZeRO not considered; pip install deepspeed)"
    if deepspeed and cfg.optim.name != "adamw":
        note = f" (ZeRO not considered: it takes AdamW, not {cfg.optim.name})"
    if best is None:
        least = min(ranked, key=lambda c: c.memory["total"])
        raise BackendError(
            f"--parallel.backend=auto: no backend fits {per_device} images per GPU on {world} GPUs of "
            f"{memory_bytes / GIB:.0f} GiB (the smallest, {least.layout.backend}, {least.why_not()}){note}; set "
            "--parallel.activation_checkpointing=true or lower --batch.batch_size_per_device with "
            "--batch.grad_accum_steps (python -m benchmarks.plan lists every layout)"
        )
    backend, ds = _config_backend(best.layout.backend)
    line = (f"--parallel.backend=auto chose {describe(best)} on {world} GPUs of {memory_bytes / GIB:.0f} GiB; "
            f"runner-up {describe(runner) if runner else 'none that fits'}{note}")  # fmt: skip
    return AutoChoice(backend, ds, line)


def _config_backend(layout_backend: str) -> tuple[str, str]:
    if layout_backend.startswith("zero"):
        return "deepspeed", str(bundled_config(int(layout_backend[-1])))
    return layout_backend.split("-")[0], ""


def hours_per_100_epochs(c: Candidate, images: int) -> float:
    return 100 * math.ceil(images / c.global_batch) * c.time.step / 3600


def gpu_kind(device_name: str) -> str | None:
    """The `scale.train.timing.GPUS` entry of a CUDA device's name, or None."""
    return next((k for k in GPUS if k in device_name.upper()), None)


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def resolve_auto(cfg: Config) -> AutoChoice | None:
    """`--parallel.backend=auto` at start-up (after `init_distributed`): on several CUDA ranks the
    planner's choice for this world size and this GPU's memory, written into `cfg.parallel`; rank 0
    decides and every rank takes its choice (one log line). One rank or CPU ranks: None (auto stays
    single / DDP, `scale.parallel.registry.resolve_backend_name`; the planner times GPUs)."""
    import os

    import torch
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.parallel.backend != "auto" or world == 1:
        return None
    if not torch.cuda.is_available():
        log.info("--parallel.backend=auto on %d CPU ranks: ddp (the planner models GPUs)", world)
        return None
    if cfg.task != "pretrain":  # the planner models MoCo's step (two views, a momentum encoder)
        log.info("--parallel.backend=auto when fine-tuning: ddp on %d ranks (--parallel.backend=fsdp or a DeepSpeed "
                 "config for models whose state does not fit one GPU)", world)  # fmt: skip
        return None
    index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    props = torch.cuda.get_device_properties(index)
    kind = gpu_kind(props.name)
    if kind is None:
        log.info("--parallel.backend=auto: %s is not in the time model's table; timed as an H100", props.name)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    choice: list[AutoChoice | None] = [None]
    refused: BackendError | None = None
    if dist.get_rank() == 0:
        try:
            choice[0] = choose_backend(cfg, world, float(props.total_memory), per_node, split_batch(cfg, world),
                                       deepspeed=deepspeed_installed(),
                                       gpu=kind or "H100")  # fmt: skip
        except BackendError as e:
            refused = e
    dist.broadcast_object_list(choice, src=0)  # one choice, whatever each rank's GPU says
    made = choice[0]
    if made is None:  # rank 0 refused: its error is the message; the others stop with it
        raise refused or BackendError("--parallel.backend=auto: rank 0 found no layout that fits (its log says why)")
    cfg.parallel.backend, cfg.parallel.deepspeed_config = made.backend, made.deepspeed_config
    if dist.get_rank() == 0:
        log.info("%s", made.line)
    return made
