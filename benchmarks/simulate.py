"""The real backends at 8-1,024 simulated ranks in one process: `python -m benchmarks.simulate`.

    python -m benchmarks.simulate --model vit_huge --parallel fsdp --world-size 512
    python -m benchmarks.simulate --model vit_base --parallel ddp,fsdp --world-size 8,64,512 --batch-size 8
    python -m benchmarks.simulate --model vit_huge --parallel hsdp --shard-size 8 --world-size 64,512

This process becomes rank r of a world of N through torch's fake process group (every collective
a no-op that still runs the real code around it) and runs `scale.parallel`'s real setup
(`scale.train.parallelize`: sharding plan, cross-rank BatchNorm, key gather, the backend's wrapping
and optimizer), then two real training steps (forward and backward per micro-batch, the optimizer
step, the momentum update) on fake tensors: shapes and dtypes without memory or arithmetic, so
ViT-H at 512 ranks takes seconds on a laptop. The second step is measured:

- memory per rank: the model state right after the backward (parameters, gradients, optimizer
  state, buffers, momentum masters: what `scale.parallel.memory` predicts) and the peak of every
  live tensor (torch's `MemTracker` on fake tensors);
- every collective with its group size, calls and bytes (the whole buffer: what an all-gather
  returns, what a reduce-scatter or all-reduce takes), read off the c10d operations as they are
  dispatched (DDP's gradient buckets through a recording communication hook).

With accumulation each micro-batch contrasts its own keys (`--batch.keys=micro`: the trainer's
default computes every micro-batch's keys first, the same collectives in another order; torch's
MemTracker does not follow that order's extra no-grad calls). Simulated: single, DDP, FSDP2 and
HSDP (a replicate x shard mesh). DDP runs one measured step after the optimizer's state is made (a
zero gradient and one optimizer step): its second forward rebuilds its gradient buckets in C++
(`Reducer::_rebuild_buckets`), which reads the bucket indices back from a tensor, and a fake tensor
has no data; its first iteration reduces all gradients as one bucket, the later ones in 25 MiB
buckets (`scale.train.traffic.ddp_buckets`). DeepSpeed ZeRO-1/2/3 do not run on fake tensors:
DeepSpeed's engine moves the module with `module.to(device)`
(`DeepSpeedEngine._configure_distributed_model`, DeepSpeed 0.19.8), and torch's `Module._apply`
swaps a FakeTensor parameter (`torch.utils.swap_tensors`), which fails ("Cannot swap t1 because it
has weakref associated with it"); their rows stay analytic (`scale.parallel.memory`,
`scale.train.traffic`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import types
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.paper import IMAGENET_TRAIN, add_output_args, check_results, write_results
from scale.arguments import FILE_NAME, NON_NEGATIVE, POSITIVE, Names, NumberList, Parser
from scale.config import Config, apply_overrides, derive
from scale.entry import run_cli
from scale.errors import ConfigError
from scale.parallel.base import Backend, SingleProcess
from scale.parallel.ddp import DDPBackend
from scale.parallel.fsdp import FSDPBackend, HSDPBackend
from scale.recipes import get_recipe
from scale.train.memory import count_params, estimate
from scale.train.parallelize import backbone_config, build_model, parallelize
from scale.train.planner import layout_memory
from scale.train.timing import Layout
from scale.train.traffic import hsdp_shard, meta_model

GIB = 2**30
RECIPE_OF = {"vit_small": "vit_s_300ep", "vit_base": "vit_b_300ep", "vit_large": "vit_l_300ep",
             "vit_huge": "vit_h_300ep", "vit_bn_large_p7": "vit_bn_l7_300ep", "resnet50": "r50_100ep"}  # fmt: skip
"""The paper's models and their recipes (scale/recipes.py)."""
SIMULATED = ("single", "ddp", "fsdp", "hsdp")
ANALYTIC = ("zero1", "zero2", "zero3")
"""DeepSpeed: see the module docstring for where it breaks on fake tensors."""


@dataclass
class Collective:
    op: str
    """'all_gather', 'reduce_scatter', 'all_reduce', 'all_to_all', 'broadcast'."""
    group: int
    """Ranks in the collective's group."""
    calls: int = 0
    bytes: float = 0.0
    """The whole buffers, summed over the calls (an all-gather's output, a reduce-scatter's or an
    all-reduce's input): each rank sends (group - 1) / group of it in a ring."""


# c10d operations -> (kind, which argument holds the whole buffer: 0 the first, 1 the second)
C10D = {
    "c10d::_allgather_base_": ("all_gather", 0),
    "c10d::allgather_": ("all_gather", 0),
    "c10d::allgather_into_tensor_coalesced_": ("all_gather", 0),
    "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d::allreduce_": ("all_reduce", 0),
    "c10d::allreduce_coalesced_": ("all_reduce", 0),
    "c10d::alltoall_base_": ("all_to_all", 1),
    "c10d::broadcast_": ("broadcast", 0),
}


def _process_group(arg: Any) -> dist.ProcessGroup | None:
    """The process group a c10d op was given (a TorchScript object at dispatch), else None."""
    if isinstance(arg, dist.ProcessGroup):
        return arg
    if isinstance(arg, torch.ScriptObject):
        try:
            return dist.ProcessGroup.unbox(arg)
        except (RuntimeError, TypeError):
            return None  # another script object (the reduce op)
    return None


class CollectiveLog(TorchDispatchMode):
    """Records every c10d collective dispatched inside it: kind, group size, calls and bytes."""

    def __init__(self, world: int):
        super().__init__()
        self.world = world
        self.by_key: dict[tuple[str, int], Collective] = {}
        self.unknown: set[str] = set()

    def add(self, op: str, group: int, nbytes: float) -> None:
        c = self.by_key.setdefault((op, group), Collective(op, group))
        c.calls += 1
        c.bytes += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if func.namespace in ("c10d", "_c10d_functional") and name not in ("c10d::barrier",):
            kind = C10D.get(name)
            if kind is None:
                self.unknown.add(name)
            else:
                op, which = kind
                tensors = [a for a in tree_flatten(args[which] if len(args) > which else [])[0]
                           if isinstance(a, torch.Tensor)]  # fmt: skip
                size = next((g.size() for g in map(_process_group, args) if g is not None), self.world)
                self.add(op, int(size), float(sum(t.numel() * t.element_size() for t in tensors)))
        return func(*args, **(kwargs or {}))

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in sorted(self.by_key.values(), key=lambda c: (c.op, c.group))]


class _Tracker(MemTracker):
    """torch's MemTracker, with gradient hooks only on the parameters that take gradients (it would
    register one on the frozen momentum encoder's too, which torch refuses)."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            trainable = types.SimpleNamespace(
                parameters=lambda: (p for p in module.parameters() if p.requires_grad), buffers=lambda: iter(())
            )
            super()._track_module_params_and_buffers(trainable, True)
        return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def state_now(backend: Backend) -> float:
    """Bytes of this rank's model state as they are now: parameters, gradients, buffers, optimizer
    state and the momentum masters, each storage once."""
    tensors = [*backend.module.parameters(), *backend.module.buffers()]
    tensors += [p.grad for p in backend.module.parameters() if p.grad is not None]
    tensors += [v for state in backend.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += backend._momentum_masters or []
    seen, total = set(), 0.0
    for t in tensors:
        storage = _local(t).untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


def sim_config(model: str, parallel: str, world: int, batch: int, ac: bool | str = False, precision: str = "bf16",
               accum: int = 1, reshard: bool = True, extra: tuple[str, ...] = (),
               shard: int = 8) -> Config:  # fmt: skip
    """The training config of a simulated run: `model`'s recipe (or ViT-B's with `--model.name`)."""
    return apply_overrides(get_recipe(RECIPE_OF.get(model, "vit_b_300ep")), [
        f"--model.name={model}", f"--parallel.backend={parallel}", f"--parallel.precision={precision}",
        f"--batch.global_batch_size={batch * world * accum}", f"--batch.grad_accum_steps={accum}",
        f"--parallel.activation_checkpointing={str(ac).lower()}", f"--parallel.reshard_after_forward={reshard}",
        f"--parallel.shard_size={hsdp_shard(world, shard)}", "--data.source=synthetic", *extra,
    ])  # fmt: skip


@contextlib.contextmanager
def fake_world(world: int, rank: int):
    """This process as rank `rank` of a fake process group of `world` ranks (ended on the way out)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _backend(parallel: str, world: int, precision: str, shard: int = 8) -> Backend:
    cpu = torch.device("cpu")  # the fake tensors' device; a GPU's numbers are the same bytes
    if parallel == "single":
        return SingleProcess(precision, cpu)
    if parallel == "ddp":
        return DDPBackend(precision, cpu)
    if parallel == "fsdp":
        return FSDPBackend(precision, cpu, mesh=init_device_mesh("cpu", (world,)))
    if parallel == "hsdp":
        g = hsdp_shard(world, shard)
        return HSDPBackend(
            precision, cpu, mesh=init_device_mesh("cpu", (world // g, g), mesh_dim_names=("replicate", "shard"))
        )
    raise AssertionError(parallel)


def _record_ddp_buckets(backend: DDPBackend, log: CollectiveLog, world: int) -> None:
    """DDP's all-reduce of its gradient buckets, recorded (the fake group's own would not return the
    bucket): a communication hook that logs each bucket and hands it back as reduced."""

    def hook(_, bucket):
        buf = bucket.buffer()
        log.add("all_reduce", world, float(buf.numel() * buf.element_size()))
        done = torch.futures.Future()
        done.set_result(buf)
        return done

    backend.model.register_comm_hook(None, hook)


def _prime_optimizer(backend: Backend) -> None:
    """The optimizer's state made as a first step would, without running one: a zero gradient on
    every trained parameter, one optimizer step, the gradients dropped."""
    params = [p for p in backend.module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    backend.optimizer.step()
    for p in params:
        p.grad = None


def simulate(model: str, parallel: str, world: int, batch: int, rank: int = 0, ac: bool | str = False,
             precision: str = "bf16", accum: int = 1, reshard: bool = True, img_size: int | None = None,
             extra: tuple[str, ...] = (), shard: int = 8) -> dict[str, Any]:  # fmt: skip
    """One simulated rank of `parallel` on `world` ranks: memory and collectives of a training step."""
    if parallel not in SIMULATED:
        raise ValueError(f"--parallel {parallel}: simulated are {', '.join(SIMULATED)}; {', '.join(ANALYTIC)} stay "
                         "analytic (DeepSpeed's engine cannot move fake tensors: benchmarks/simulate.py)")  # fmt: skip
    if parallel == "single" and world != 1:
        raise ValueError("the single-process backend runs on one rank: --world-size 1")
    extra = (*extra, f"--model.img_size={img_size}") if img_size else extra
    cfg = sim_config(model, parallel, world, batch, ac, precision, accum, reshard, extra, shard)
    derived = derive(cfg, world, IMAGENET_TRAIN)
    trainable, momentum = count_params(cfg)
    with fake_world(world, rank), mock.patch("scale.parallel.base.check_cpu_bf16"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor")  # views.adjacent asks
        backend = _backend(parallel, world, precision, shard)  # a device mesh is made outside fake tensors
        return _run(cfg, backend, derived, parallel, world, batch, accum, trainable, momentum, rank, ac, reshard)


def _run(cfg, backend, derived, parallel, world, batch, accum, trainable, momentum, rank, ac, reshard) -> dict:
    with torch.device("meta"):  # built outside fake tensors (the momentum encoder is a deep copy)
        meta = build_model(cfg)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = meta.to_empty(device="cpu")
        log = CollectiveLog(world)
        with mock.patch("torch.nn.parallel.distributed._verify_param_shape_across_processes"):  # reads shapes back
            parallelize(cfg, backend, derived, model=fake)
        if parallel == "ddp":
            _record_ddp_buckets(backend, log, world)
        size = cfg.model.img_size
        micro = [torch.randn(2, batch, 3, size, size) for _ in range(accum)]

        tracker: _Tracker | None = None

        def step() -> float:
            state = 0.0
            for i, views in enumerate(micro):
                if tracker is not None:
                    tracker.reset_mod_stats()  # per-module stats allow one call; the peak stays
                backend.forward_backward(views[0], views[1], accum, last=i == accum - 1)
                state = max(state, state_now(backend))
            result = backend.step(derived.lr, cfg.optim.weight_decay, cfg.optim.clip_grad)
            backend.momentum_update(0.99, result.applied)
            return state

        if parallel == "ddp":
            _prime_optimizer(backend)  # DDP's second forward rebuilds its buckets from data: one step only
        else:
            step()  # the optimizer's state (and FSDP2's lazy set-up) exist after the first step
        log.by_key.clear()
        tracker = _Tracker()
        tracker.track_external(backend.module, backend.optimizer)
        with tracker, log:
            state = step()
        peak = max(tracker.get_tracker_snapshot("peak").values(), key=lambda s: s["Total"])
    theory = backend.state_bytes(trainable, momentum, accum)
    est = estimate(cfg, backend, batch)
    kind = {"single": "ddp", "fsdp": "fsdp" if reshard else "fsdp-noreshard",
            "hsdp": "hsdp" if reshard else "hsdp-noreshard"}.get(parallel, parallel)  # fmt: skip
    planned = layout_memory(
        meta_model(cfg), Layout(kind, ac, batch * accum, batch), world, backend.precision, shard=cfg.parallel.shard_size
    )
    return {
        "model": cfg.model.name, "parallel": parallel, "world": world, "rank": rank, "batch_per_rank": batch,
        "accum": accum, "activation_checkpointing": ac, "precision": backend.precision, "reshard": reshard,
        "trainable": trainable, "momentum": momentum,
        "state_gib": state / GIB, "theory_state_gib": sum(theory.values()) / GIB,
        "theory_by_kind_gib": {k: v / GIB for k, v in theory.items()},
        "peak_gib": peak["Total"] / GIB, "peak_by_kind_gib": {k: v / GIB for k, v in peak.items() if k != "Total"},
        "estimate_gib": est.total / GIB, "estimate_activations_gib": est.activations / GIB,
        "planned_gib": planned["total"] / GIB, "planned_transient_gib": planned["transient"] / GIB,
        "collectives": log.rows(), "unknown_ops": sorted(log.unknown),
    }  # fmt: skip


def write(rows: list[dict[str, Any]], out: Path, name: str, overwrite: bool = False) -> Path:
    lines = [f"# Simulated ranks: {name}", "", "Made by `python -m benchmarks.simulate` (fake process group, fake "
             "tensors: one process as rank 0 of N). GiB per rank; collectives per training step, whole buffers.", "",
             "The peak is set beside the planner's memory of the same layout (`scale.train.planner.layout_memory`: "
             "state + activations + autocast's weight copies + transient buffers).", "",
             "| model | backend | ranks | batch/rank | AC | state (theory) | peak | planned (peak / planned) "
             "| collectives |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        comms = "; ".join(f"{c['op']} x{c['calls']} {c['bytes'] / GIB:.2f} GiB" for c in r["collectives"]) or "none"
        ac = {True: "on", False: "off"}.get(r["activation_checkpointing"], r["activation_checkpointing"])
        lines.append(f"| {r['model']} | {r['parallel']} | {r['world']} | {r['batch_per_rank']} | {ac} | "
                     f"{r['state_gib']:.2f} ({r['theory_state_gib']:.2f}) | {r['peak_gib']:.2f} | "
                     f"{r['planned_gib']:.2f} ({r['peak_gib'] / r['planned_gib']:.3f}) | {comms} |")  # fmt: skip
    files = {f"{name}.json": json.dumps(rows, indent=1), f"{name}.md": "\n".join(lines) + "\n"}
    return write_results(out, files, overwrite)[1]


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m benchmarks.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base")
    p.add_argument("--parallel", type=Names(SIMULATED), default="fsdp", help=f"comma-separated: {', '.join(SIMULATED)}")
    p.add_argument("--world-size", type=NumberList(POSITIVE), default="8,64", help="comma-separated rank counts")
    p.add_argument("--batch-size", type=NON_NEGATIVE, default=0,
                   help="images per rank (default 0: 4096 / ranks, at most 64)")  # fmt: skip
    p.add_argument("--accum", type=POSITIVE, default=1)
    p.add_argument(
        "--ac",
        nargs="?",
        const="true",
        default="false",
        choices=["false", "true", "selective"],
        help="activation checkpointing: every block (true, the default of a bare --ac) or selective",
    )
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--no-reshard", action="store_true", help="FSDP2: keep the gathered parameters until backward")
    p.add_argument("--shard-size", type=POSITIVE, default=8, help="HSDP: ranks per shard group (default 8: a node)")
    add_output_args(p)
    p.add_argument("--name", type=FILE_NAME, default=None, help="results file name (default simulate-MODEL)")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parser().parse_args(argv)
    ac = {"true": True, "false": False}.get(args.ac, args.ac)
    plan = []
    for parallel in args.parallel:
        for world in args.world_size:
            n = 1 if parallel == "single" else world
            batch = args.batch_size or max(1, min(64, math.ceil(4096 / n)))
            # Every configuration checked before the first is simulated (a wrong model or batch split).
            cfg = sim_config(args.model, parallel, n, batch, ac=ac, precision=args.precision, accum=args.accum,
                             reshard=not args.no_reshard, shard=args.shard_size)  # fmt: skip
            try:
                backbone_config(cfg)
            except ValueError as e:
                raise ConfigError(f"--model {args.model}: {e}") from None
            plan.append((parallel, n, batch))
    name = args.name or f"simulate-{args.model}"
    check_results(args.out, [f"{name}.json", f"{name}.md"], args.overwrite)
    rows = []
    for parallel, n, batch in plan:
        row = simulate(args.model, parallel, n, batch, ac=ac, precision=args.precision, accum=args.accum,
                       reshard=not args.no_reshard, shard=args.shard_size)  # fmt: skip
        rows.append(row)
        comms = "; ".join(f"{c['op']}[{c['group']}] x{c['calls']} {c['bytes'] / GIB:.3f} GiB"
                          for c in row["collectives"])  # fmt: skip
        print(f"{args.model} {parallel} x{n}: state {row['state_gib']:.2f} GiB (theory "
              f"{row['theory_state_gib']:.2f}), peak {row['peak_gib']:.2f} GiB (planned "
              f"{row['planned_gib']:.2f}); {comms}", flush=True)  # fmt: skip
    if args.out != "-":
        print(write(rows, Path(args.out), name, args.overwrite))
    return rows


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
