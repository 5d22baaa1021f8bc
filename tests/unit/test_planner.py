"""The planner and `--parallel.backend=auto` (scale.train.planner, scale.train.timing): the choice
for a launched world size and a GPU's memory, mocked here (no GPU, one process); an explicit backend
is never overridden; the time model's rules (ring latency linear in N, all-reduce by tree when
cheaper, DDP's reduction hidden only under the backward)."""

import logging
import types
from unittest import mock

import pytest

from scale.config import apply_overrides
from scale.errors import BackendError
from scale.recipes import get_recipe
from scale.train import planner
from scale.train.planner import GIB, best_and_runner_up, candidates, resolve_auto
from scale.train.timing import Cluster, Layout, step_time
from scale.train.traffic import meta_model


def _cfg(recipe="vit_h_300ep", *extra):
    return apply_overrides(get_recipe(recipe), ["--parallel.backend=auto", "--data.source=synthetic", *extra])


def _launched(world: int, memory_gib: float, name="NVIDIA H100 80GB HBM3", deepspeed=True):
    """As rank 0 of `world` CUDA ranks, 8 per node, each GPU with `memory_gib`."""
    props = types.SimpleNamespace(name=name, total_memory=int(memory_gib * GIB))
    return [
        mock.patch("torch.distributed.is_initialized", return_value=True),
        mock.patch("torch.distributed.get_world_size", return_value=world),
        mock.patch("torch.distributed.get_rank", return_value=0),
        mock.patch("torch.distributed.broadcast_object_list"),
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=8),
        mock.patch("torch.cuda.get_device_properties", return_value=props),
        mock.patch("scale.train.planner.deepspeed_installed", return_value=deepspeed),
        mock.patch.dict("os.environ", {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"}),
    ]


def _resolve(cfg, world, memory_gib, **kw):
    patches = _launched(world, memory_gib, **kw)
    for p in patches:
        p.start()
    try:
        return resolve_auto(cfg)
    finally:
        for p in reversed(patches):
            p.stop()


def test_auto_picks_the_fastest_backend_that_fits_and_logs_the_runner_up(caplog):
    cfg = _cfg()  # ViT-H/14, 4096 images
    with caplog.at_level(logging.INFO, logger="scale.train.planner"):
        made = _resolve(cfg, 256, 80)  # 16 images per GPU
    assert made is not None and cfg.parallel.backend == made.backend
    lines = [r.getMessage() for r in caplog.records if "parallel.backend=auto chose" in r.getMessage()]
    assert len(lines) == 1 and "runner-up" in lines[0] and "256 GPUs of 80 GiB" in lines[0]
    # the same choice as the planner's ranking over the backends at the run's own split
    backends = ("ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3")
    ranked = candidates(cfg, Cluster(256, memory_gib=80.0), backends, (False,), (16,))
    best, runner = best_and_runner_up(ranked)
    assert planner._config_backend(best.layout.backend) == (cfg.parallel.backend, cfg.parallel.deepspeed_config)
    assert runner.layout.backend != best.layout.backend


def test_auto_shards_when_a_replica_does_not_fit_and_refuses_when_nothing_does():
    # ViT-H at 64 images per GPU (64 GPUs) with recompute: a DDP replica's state alone is ~12 GiB; on
    # 16 GiB GPUs (12.4 usable) only sharding fits
    ac = "--parallel.activation_checkpointing=true"
    cfg = _cfg("vit_h_300ep", ac)
    _resolve(cfg, 64, 16)
    assert cfg.parallel.backend in ("fsdp", "hsdp", "deepspeed")
    if cfg.parallel.backend == "deepspeed":
        assert cfg.parallel.deepspeed_config.endswith(("zero1.json", "zero2.json", "zero3.json"))
    # without DeepSpeed installed, the ZeRO stages are not candidates
    cfg = _cfg("vit_h_300ep", ac)
    _resolve(cfg, 64, 16, deepspeed=False)
    assert cfg.parallel.backend in ("fsdp", "hsdp") and cfg.parallel.deepspeed_config == ""
    with pytest.raises(BackendError, match="no backend fits .*activation_checkpointing"):
        _resolve(_cfg(), 64, 40)


def test_an_explicit_backend_is_never_overridden_and_cpu_ranks_keep_ddp():
    cfg = _cfg("vit_h_300ep", "--parallel.backend=ddp")
    assert _resolve(cfg, 64, 8) is None and cfg.parallel.backend == "ddp"  # would not fit: the memory check says so
    cfg = _cfg("vit_h_300ep", "--parallel.backend=deepspeed", "--parallel.deepspeed_config=ds_configs/zero3.json")
    assert _resolve(cfg, 64, 8) is None and cfg.parallel.backend == "deepspeed"
    cfg = _cfg()
    with mock.patch("torch.cuda.is_available", return_value=False), \
         mock.patch("torch.distributed.is_initialized", return_value=True), \
         mock.patch("torch.distributed.get_world_size", return_value=2):  # fmt: skip
        assert resolve_auto(cfg) is None
    assert cfg.parallel.backend == "auto"  # the launch resolves it to ddp (scale.parallel.registry)


def test_the_planner_marks_what_does_not_fit_and_prefers_no_accumulation():
    cfg = _cfg()
    ranked = candidates(cfg, Cluster(64, memory_gib=80.0))
    assert {c.layout.backend for c in ranked} == {"ddp", "fsdp", "fsdp-noreshard", "hsdp", "hsdp-noreshard", "zero1",
                                                   "zero2", "zero3"}  # fmt: skip
    for c in ranked:
        assert c.fits == (c.memory["total"] <= c.limit)
        assert (c.why_not() == "") == c.fits and c.images_per_s == pytest.approx(4096 / c.time.step)
    best, _ = best_and_runner_up(ranked)
    assert best.layout.accum == 1
    fastest = min(c.time.step for c in ranked if c.fits and c.layout.accum == 1)
    assert fastest <= best.time.step <= fastest * (1 + planner.TOLERANCE)
    # the simplest backend of those as fast: none simpler within the tolerance
    near = [c for c in ranked if c.fits and c.layout.accum == 1 and c.time.step <= fastest * (1 + planner.TOLERANCE)]
    assert planner.SIMPLER.index(best.layout.backend) == min(planner.SIMPLER.index(c.layout.backend) for c in near)
    # on 40 GiB GPUs, 64 images per GPU without recompute do not fit (ViT-H/14's activations, weight copies: ~49 GiB)
    tight = candidates(cfg, Cluster(64, memory_gib=40.0), ("ddp",), (False,), (64,))[0]
    assert not tight.fits and "activations 48.9" in tight.why_not()


def test_ring_latency_grows_with_n_and_the_all_reduce_takes_the_tree_across_nodes():
    small, large = Cluster(64), Cluster(1024)
    assert large.ring(0.0) / small.ring(0.0) == pytest.approx(1023 / 63)
    ring = 2 * 1023 * large.hop_s
    assert large.all_reduce(0.0) < ring  # the tree: logarithmic in the nodes
    assert Cluster(8).busbw == 360e9 and Cluster(16).busbw == pytest.approx(360e9)  # 8 NICs x 50 GB/s x 0.9


def test_ddp_hides_its_reduction_only_under_the_backward_and_fsdp_is_latency_bound_at_1024_but_not_hsdp():
    cfg = _cfg("vit_b_300ep")
    model = meta_model(cfg)
    t8 = step_time(model, cfg, Layout("ddp", False, 64, 64), Cluster(64))
    reduce = Cluster(64).all_reduce(4.0 * sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert t8.parts["gradients"] < reduce and t8.parts["gradients"] >= reduce - t8.compute / 2 - 1e-9
    t = step_time(model, cfg, Layout("fsdp", False, 4, 4), Cluster(1024))
    assert t.exposed_comm > 10 * t.compute  # ~300 gathers, each (N - 1) ring steps
    # HSDP: the gathers stay inside a node ((g - 1) NVLink steps), the shards' all-reduce crosses nodes
    h = step_time(model, cfg, Layout("hsdp", False, 4, 4), Cluster(1024))
    assert h.step < t.step / 10 and h.parts["parameters_and_gradients"] < t.parts["parameters_and_gradients"] / 50


def test_the_plan_command_lists_every_layout_and_marks_one_choice(tmp_path, capsys):
    from benchmarks.plan import main

    rows = main(["--model", "vit_small", "--gpus", "64", "--gpu-memory", "80", "--simulate", "none",
                 "--out", str(tmp_path)])  # fmt: skip
    assert sum(r["chosen"] for r in rows) == 1 and sum(r["runner_up"] for r in rows) == 1
    # backends x recompute (selective not under the per-block gathers of fsdp, hsdp, zero3) x micro-batches 64..1
    assert len(rows) == (3 * 3 + 5 * 2) * 7
    assert all(r["why_not"] for r in rows if not r["fits"])
    text = (tmp_path / "plan-vit_small-64x80g.md").read_text()
    assert "Chosen: **ddp, 64 img/GPU**" in text and "| **chosen** | ddp, 64 img/GPU |" in text
    wrong = ((["--model", "vit_tiny", "--gpus", "64"], "vit_small"),
             (["--model", "vit_small", "--gpus", "96", "--simulate", "none"], "does not split"))  # fmt: skip
    for argv, words in wrong:
        with pytest.raises(SystemExit):  # argparse's one line
            main([*argv, "--out", "-"])
        assert words in capsys.readouterr().err
