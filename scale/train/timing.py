"""The time of one MoCo v3 training step on N GPUs, per layout: compute, the collectives of
`scale.train.traffic` on a hierarchical network, overlap only where the schedule allows it, the
optimizer and momentum update from their bytes, and kernel-launch overhead. The planner
(`scale.train.planner`) ranks layouts by it; `benchmarks.scaling` prints it beside Table 3.
Every constant is a field of `Cluster`, with its source; docs/scaling.md has the derivation.

- compute: F = 16 x MACs per image (`scale.models.flops`: per view the base encoder's forward 2,
  backward 4, the momentum encoder's forward 2 FLOPs per MAC), at `mfu` of the GPU's bf16 peak;
  activation checkpointing recomputes the base encoder's forward (+2 per MAC per view).
- a collective of S bytes (its whole buffer) on n ranks, NCCL's alpha-beta model: a ring
  all-gather or reduce-scatter takes (n-1)/n S / busbw + (n-1) a, latency linear in n (NCCL runs
  these as rings; its PAT algorithm, logarithmic, is for one GPU per node); an all-reduce
  2 (n-1)/n S / busbw plus the smaller of the ring's 2 (n-1) a and the tree's
  2 ((g-1) a_nvlink + ceil(log2 nodes) a_ib) (NCCL picks the faster). a is a ring step's latency:
  `hop_us_nvlink` inside a node, `hop_us_ib` once a ring crosses nodes (every step then waits for
  the slowest hop). busbw: NVLink inside a node; across nodes NCCL's rails run one ring per NIC,
  so a node's g NICs carry g x `nic_gbps` x `nic_efficiency`, capped by NVLink (NVLS and SHARP,
  which raise all-reduce busbw further, are not modelled).
- overlap, as the schedules allow: DDP's and ZeRO-1/2's gradient reduction under the last
  micro-batch's base-encoder backward (half the step's FLOPs without recompute), its last bucket
  never hidden; ZeRO-1/2's all-gather of the updated parameters after the step, exposed; FSDP2 and
  ZeRO-3 prefetch one block ahead: a block's gathers (and in the backward the previous block's
  reduce-scatter) hide under the current block's compute, the first never. The key gathers and the
  cross-rank BatchNorm sums sit on the critical path: exposed.
- optimizer and momentum update: AdamW reads parameter, gradient and both moments and writes
  parameter and moments, plus weight decay and the gradient-norm pass: 44 bytes per trained
  parameter this rank holds; the momentum update reads both encoders and writes one: 12 bytes per
  momentum parameter held (about 56 per parameter in all), at `hbm_efficiency` of the HBM bandwidth.
- launch overhead: eager PyTorch launches about `kernels_per_block` kernels per block per encoder
  call (forward, twice that backward), 3 per FSDP2 gather (copy-in, collective, copy-out) and
  `kernels_other` more (heads, loss, optimizer); the host issues one each `launch_us`. A step
  takes the longer of the GPU's time and the host's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from scale.models import MoCoV3
from scale.models.flops import moco_training_flops
from scale.parallel.recompute import recompute_mode
from scale.train.parallelize import layout_of
from scale.train.traffic import (
    Traffic,
    Unit,
    batchnorm_traffic,
    fsdp_units,
    hsdp_shard,
    key_gather_traffic,
    step_traffic,
    zero3_units,
    zero_settings,
)

SELECTIVE_RECOMPUTE = 0.1
"""Selective recompute's cost, as a fraction of a block's forward: the normalisations, GELU, casts
and adds it recomputes are memory-bound and about a tenth of the forward's time at 40% MFU
(assumed; `benchmarks.throughput --set=--parallel.activation_checkpointing=selective` measures it)."""

GPUS = {  # bf16 dense peak TFLOP/s, memory GiB, HBM TB/s (NVIDIA's data sheets, SXM parts)
    "H100": (989.0, 80.0, 3.35),
    "H200": (989.0, 141.0, 4.8),
    "A100": (312.0, 80.0, 2.0),
}


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int = 8
    gpu: str = "H100"
    mfu: float = 0.40
    """Model FLOPs utilisation of the compute, assumed (40%: large ViT training on H100 in bf16
    reaches 35-50%); a measured value replaces it (`measured_mfu`)."""
    nvlink_gbps: float = 360.0
    """All-gather / reduce-scatter / all-reduce bus bandwidth per GPU inside an 8-GPU NVLink-4 node
    without NVLS (the order NVIDIA's nccl-tests report for H100 SXM)."""
    nic_gbps: float = 50.0
    """Per GPU across nodes: one 400 Gb/s NDR InfiniBand NIC per GPU."""
    nic_efficiency: float = 0.9
    hop_us_nvlink: float = 1.5
    hop_us_ib: float = 6.0
    launch_us: float = 5.0
    """Host time per eager kernel launch (PyTorch dispatch + CUDA launch)."""
    kernels_per_block: int = 15
    kernels_other: int = 150
    hbm_efficiency: float = 0.8
    memory_gib: float | None = None
    """GPU memory; None: the GPU's."""
    measured: str = ""
    """Where a measured MFU came from ('' when assumed)."""

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)

    @property
    def peak_flops(self) -> float:
        return GPUS[self.gpu][0] * 1e12

    @property
    def memory_bytes(self) -> float:
        return (self.memory_gib if self.memory_gib is not None else GPUS[self.gpu][1]) * 2**30

    @property
    def busbw(self) -> float:
        """Bytes/s of bus bandwidth per GPU for a collective over all the GPUs."""
        nvlink = self.nvlink_gbps * 1e9
        if self.gpus <= self.gpus_per_node:
            return nvlink
        return min(nvlink, self.gpus_per_node * self.nic_gbps * self.nic_efficiency * 1e9)

    @property
    def hop_s(self) -> float:
        return (self.hop_us_nvlink if self.gpus <= self.gpus_per_node else self.hop_us_ib) * 1e-6

    def ring(self, nbytes: float, calls: int = 1) -> float:
        """Seconds of `calls` ring all-gathers / reduce-scatters moving `nbytes` in all."""
        n = self.gpus
        if n == 1 or calls == 0:
            return 0.0
        return (n - 1) / n * nbytes / self.busbw + calls * (n - 1) * self.hop_s

    def all_reduce(self, nbytes: float, calls: int = 1) -> float:
        n = self.gpus
        if n == 1 or calls == 0:
            return 0.0
        g = min(n, self.gpus_per_node)
        tree = 2 * ((g - 1) * self.hop_us_nvlink + math.ceil(math.log2(self.nodes)) * self.hop_us_ib) * 1e-6
        latency = min(2 * (n - 1) * self.hop_s, tree) if self.nodes > 1 else 2 * (n - 1) * self.hop_s
        return 2 * (n - 1) / n * nbytes / self.busbw + calls * latency


@dataclass(frozen=True)
class Layout:
    """What the planner chooses: a backend (`scale.train.traffic.BACKENDS`), recompute, images per
    GPU and micro-batch (their ratio the gradient accumulation)."""

    backend: str
    activation_checkpointing: bool | str
    """False, True (every block recomputed) or 'selective' (`scale.parallel.recompute`)."""
    images_per_gpu: int
    micro_batch: int

    @property
    def accum(self) -> int:
        return self.images_per_gpu // self.micro_batch

    def describe(self) -> str:
        ac = {"full": " + AC", "selective": " + SAC"}.get(recompute_mode(self.activation_checkpointing), "")
        acc = f" x {self.accum} micro-batches" if self.accum > 1 else ""
        return f"{self.backend}{ac}, {self.micro_batch} img/GPU{acc}"


@dataclass
class StepTime:
    compute: float
    exposed_comm: float
    optimizer: float
    host: float
    """Seconds the host needs to launch the step's kernels."""
    comm_total: float
    """Seconds of all collectives if none overlapped."""
    comm_bytes: float
    collectives: int
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def gpu(self) -> float:
        return self.compute + self.exposed_comm + self.optimizer

    @property
    def step(self) -> float:
        return max(self.gpu, self.host)

    def as_dict(self) -> dict:
        return {**asdict(self), "gpu": self.gpu, "step": self.step}


def hsdp_groups(cluster: Cluster) -> tuple[Cluster, Cluster]:
    """HSDP on `cluster`: its shard group (one node's GPUs, NVLink) and the replicas of a shard (one
    GPU per node, each on its own NIC: the rails)."""
    g = hsdp_shard(cluster.gpus, 0, cluster.gpus_per_node)
    return replace(cluster, gpus=g), replace(cluster, gpus=max(1, cluster.gpus // g), gpus_per_node=1)


def _blocks(units: list[Unit], trained: bool, depth: int) -> tuple[list[tuple[float, int]], list[Unit]]:
    """Per block of one encoder: (gather bytes, collectives); and the units outside the blocks."""
    per = [(0.0, 0)] * depth
    others = []
    for u in units:
        if u.trained != trained:
            continue
        if u.block is None:
            others.append(u)
        else:
            b, n = per[u.block]
            per[u.block] = (b + u.gather, n + 1)
    return per, others


def _pipelined(comms: list[float], computes: list[float]) -> float:
    """One pass over the blocks, each block's communication prefetched under the previous block's
    compute: the first is exposed, then each block takes the longer of its compute and the next's
    communication."""
    t = comms[0] if comms else 0.0
    for i, c in enumerate(computes):
        nxt = comms[i + 1] if i + 1 < len(comms) else 0.0
        t += max(c, nxt)
    return t


def step_time(model: MoCoV3, cfg, layout: Layout, cluster: Cluster) -> StepTime:
    """The step time of `layout` for MoCo v3 `model` (on meta) of `cfg` on `cluster`."""
    depth = len(layout_of(model).blocks(model.base_encoder))  # the repeated units: blocks, or a ResNet's stages
    flops = moco_training_flops(model.base_encoder.cfg, cfg.model.dim, cfg.model.mlp_dim)
    per_flop = 1.0 / (cluster.peak_flops * cluster.mfu)
    views = 1 if model.joint_views else 2
    A, m, N = layout.accum, layout.micro_batch, cluster.gpus
    # seconds per micro-batch, per encoder call: backbone forward per block, its backward, the heads
    fwd_call = flops.backbone / 4 * m * per_flop / views
    fwd_block = fwd_call / depth
    mode = recompute_mode(layout.activation_checkpointing)
    recompute = {"full": 1.0, "selective": SELECTIVE_RECOMPUTE}.get(mode, 0.0)
    bwd_block = 2 * fwd_block + recompute * fwd_block
    heads = (flops.projector + flops.predictor) * m * per_flop
    compute = A * (views * depth * (fwd_block * 2 + bwd_block) + heads)

    traffic = step_traffic(cfg, layout.backend, N, m, A, precision="bf16", model=model, shard=cluster.gpus_per_node)
    comm_bytes = sum(t.bytes for t in traffic.values())
    ncoll = sum(t.calls for t in traffic.values())
    group, replicas = hsdp_groups(cluster)
    comm_total = sum(
        cluster.all_reduce(t.bytes, t.calls) if op == "all_reduce"
        else replicas.all_reduce(t.bytes, t.calls) if op == "replica_all_reduce"
        else group.ring(t.bytes, t.calls) if op.startswith("shard_")
        else cluster.ring(t.bytes, t.calls)
        for op, t in traffic.items()
    )  # fmt: skip
    # always exposed: the key gathers (their bytes are in traffic's all_gather) and the BatchNorm sums
    keys = cluster.ring(key_gather_traffic(cfg, m, N, A).bytes, 2 * A)
    bn = batchnorm_traffic(model, A)
    exposed = keys + cluster.all_reduce(bn.bytes, bn.calls)
    parts = {"keys": keys, "batchnorm": exposed - keys}
    kernels = cluster.kernels_other + A * views * depth * cluster.kernels_per_block * (
        4 + {"full": 1.0, "selective": 0.5}.get(mode, 0.0)
    )
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    M = sum(p.numel() for p in model.momentum_encoder.parameters())
    last_backward = views * depth * bwd_block  # the window the gradient reduction may hide under

    if N == 1:
        held_p, held_m = P, M
    elif layout.backend in ("ddp", "zero1", "zero2"):
        if layout.backend == "ddp":  # one all-reduce of the gradients in buckets, under the last backward
            buckets = traffic["all_reduce"].calls - bn.calls
            reduce, last = cluster.all_reduce(4.0 * P, buckets), cluster.all_reduce(4.0 * P / buckets, 1)
            parts["gradients"] = max(reduce - last_backward, last)
            held_p = P
        else:  # reduce-scatter in buckets under the backward (ZeRO-2 every micro-batch), then all-gather
            times = A if layout.backend == "zero2" else 1
            buckets = traffic["reduce_scatter"].calls // times
            reduce, last = cluster.ring(4.0 * P, buckets), cluster.ring(4.0 * P / buckets, 1)
            parts["gradients"] = times * max(reduce - last_backward, last)
            parts["parameters"] = cluster.ring(4.0 * P, traffic["all_gather"].calls - 2 * A)
            held_p = P / N
        exposed += parts["gradients"] + parts.get("parameters", 0.0)
        held_m = M
    else:  # fsdp, hsdp, zero3 (with or without resharding): per block, prefetched one ahead
        exposed += _sharded(model, cfg, layout, cluster, traffic, fwd_block, bwd_block, heads) - compute
        parts["parameters_and_gradients"] = exposed - parts["keys"] - parts["batchnorm"]
        hsdp = layout.backend.startswith("hsdp")
        kernels += 3 * traffic["shard_all_gather" if hsdp else "all_gather"].calls
        shards = group.gpus if hsdp else N
        held_p, held_m = P / shards, M / shards
    optimizer = (44 * held_p + 12 * held_m) / (GPUS[cluster.gpu][2] * 1e12 * cluster.hbm_efficiency)
    return StepTime(compute, exposed, optimizer, kernels * cluster.launch_us * 1e-6, comm_total, comm_bytes, ncoll,
                    parts)  # fmt: skip


def _sharded(model: MoCoV3, cfg, layout: Layout, cluster: Cluster, traffic: dict[str, Traffic], fwd_block: float,
             bwd_block: float, heads: float) -> float:  # fmt: skip
    """GPU seconds of a step of FSDP2 or ZeRO-3: every encoder call a pass over the blocks with each
    block's gathers (and, in the backward, the previous block's reduce-scatter) prefetched under the
    current block's compute."""
    N, A, depth = cluster.gpus, layout.accum, len(layout_of(model).blocks(model.base_encoder))
    views = 1 if model.joint_views else 2
    hsdp = layout.backend.startswith("hsdp")
    group, replicas = hsdp_groups(cluster) if hsdp else (cluster, None)
    if layout.backend == "zero3":  # per module, fp32; gradients reduced in buckets every micro-batch
        units = zero3_units(model, N, int(zero_settings(3).get("stage3_param_persistence_threshold", 100_000)))
        buckets = traffic["reduce_scatter"].calls // A
    else:
        units = fsdp_units(model, group.gpus, 2)
        buckets = 0  # one reduce-scatter per unit, counted with the unit
    reshard = not layout.backend.endswith("-noreshard")
    base, base_other = _blocks(units, True, depth)
    mom, mom_other = _blocks(units, False, depth)

    def reduce(u: Unit) -> float:  # a unit's gradients: reduce-scatter (HSDP: in the group, then all-reduce)
        t = group.ring(u.scatter, 0 if buckets else 1)
        return t + (replicas.all_reduce(u.scatter / group.gpus, 1) if replicas is not None else 0.0)

    scatter = [0.0] * depth
    for u in units:
        if u.trained and u.block is not None:
            scatter[u.block] += reduce(u)
    other_scatter = sum(reduce(u) for u in base_other if u.scatter)
    other_scatter += cluster.ring(0.0, buckets)  # ZeRO-3's bucket latency
    cluster = group  # the gathers: inside the shard group
    gpu = 0.0
    for micro in range(A):
        scatter_now = layout.backend == "zero3" or micro == A - 1
        for call in range(views):
            gather = reshard or call == 0
            g_base = [cluster.ring(b, n) if gather else 0.0 for b, n in base]
            gpu += sum(cluster.ring(u.gather) for u in base_other if gather) + _pipelined(g_base, [fwd_block] * depth)
            g_mom = [cluster.ring(b, n) for b, n in mom]
            gpu += sum(cluster.ring(u.gather) for u in mom_other) + _pipelined(g_mom, [fwd_block] * depth)
        for call in range(views):
            back = [cluster.ring(b, n) if reshard else 0.0 for b, n in base][::-1]
            if reshard:  # the predictor each call, the encoder's own units once per micro-batch
                gpu += sum(cluster.ring(u.gather) for u in base_other if call == 0 or not u.encoder_root)
            if scatter_now and call == views - 1:  # a block's reduce-scatter follows its last backward
                scat = scatter[::-1]
                back = [g + s for g, s in zip(back, [0.0, *scat[:-1]], strict=True)]
                gpu += scat[-1] + other_scatter
            gpu += _pipelined(back, [bwd_block] * depth)
        gpu += heads
    return gpu
