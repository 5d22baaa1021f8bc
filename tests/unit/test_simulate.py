"""The real backends at 8 and 64 fake ranks in this process (`benchmarks.simulate`): the model state
each rank holds equals the theory of `scale.parallel.memory`, and the collectives of a step equal
the communication model of `scale.train.traffic`, call for call and byte for byte."""

import pytest

from benchmarks.simulate import sim_config, simulate
from scale.train.traffic import batchnorm_traffic, meta_model, step_traffic

SMALL = ("--model.depth=2", "--model.img_size=32", "--model.patch_size=8")  # ViT-S width, its real heads


def _recorded(row, world):
    return {c["op"]: (c["calls"], c["bytes"]) for c in row["collectives"] if c["group"] == world}


@pytest.mark.parametrize("world", [8, 64])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fsdp2_at_fake_ranks_holds_the_theory_and_moves_the_modelled_bytes(world, precision):
    row = simulate("vit_small", "fsdp", world, 4, precision=precision, extra=SMALL)
    # The state right after the backward: sharded fp32 parameters, gradients, AdamW moments and the
    # momentum encoder, against the theory (which leaves out FSDP2's padding and the BatchNorm buffers).
    assert row["state_gib"] == pytest.approx(row["theory_state_gib"], rel=0.05)
    model = step_traffic(sim_config("vit_small", "fsdp", world, 4, precision=precision, extra=SMALL), "fsdp",
                         world, 4, precision=precision)  # fmt: skip
    assert _recorded(row, world) == {op: (t.calls, t.bytes) for op, t in model.items()}
    assert not row["unknown_ops"]


def test_fsdp2_without_resharding_and_with_accumulation_moves_the_modelled_bytes():
    row = simulate("vit_small", "fsdp", 8, 2, accum=2, reshard=False, extra=SMALL)
    cfg = sim_config("vit_small", "fsdp", 8, 2, accum=2, reshard=False, extra=SMALL)
    model = step_traffic(cfg, "fsdp-noreshard", 8, 2, accum=2)
    assert _recorded(row, 8) == {op: (t.calls, t.bytes) for op, t in model.items()}


@pytest.mark.parametrize(("world", "shard"), [(8, 2), (64, 4)])
def test_hsdp_at_fake_ranks_holds_the_theory_and_moves_the_modelled_bytes(world, shard):
    # sharded inside groups of `shard` ranks, replicated across world / shard groups
    row = simulate("vit_small", "hsdp", world, 4, extra=SMALL, shard=shard)
    assert row["state_gib"] == pytest.approx(row["theory_state_gib"], rel=0.05)
    cfg = sim_config("vit_small", "hsdp", world, 4, extra=SMALL, shard=shard)
    model = step_traffic(cfg, "hsdp", world, 4, shard=shard)
    by_group = {}
    for c in row["collectives"]:
        by_group.setdefault(c["group"], {})[c["op"]] = (c["calls"], c["bytes"])
    assert by_group[shard] == {"all_gather": (model["shard_all_gather"].calls, model["shard_all_gather"].bytes),
                               "reduce_scatter": (model["shard_reduce_scatter"].calls,
                                                  model["shard_reduce_scatter"].bytes)}  # fmt: skip
    replica = model["replica_all_reduce"]
    assert by_group[world // shard] == {"all_reduce": (replica.calls, pytest.approx(replica.bytes))}
    assert by_group[world] == {op: (t.calls, t.bytes) for op, t in model.items() if op in ("all_gather", "all_reduce")}
    assert not row["unknown_ops"]


def test_a_per_view_backbone_moves_the_modelled_bytes():
    # ViT-BN: each view through the encoders on its own, every BatchNorm reduced per view
    extra = ("--model.depth=2", "--model.img_size=28", "--model.patch_size=7")
    row = simulate("vit_bn_large_p7", "fsdp", 8, 2, extra=extra)
    model = step_traffic(sim_config("vit_bn_large_p7", "fsdp", 8, 2, extra=extra), "fsdp", 8, 2)
    assert _recorded(row, 8) == {op: (t.calls, t.bytes) for op, t in model.items()}


def test_ddp_at_fake_ranks_reduces_every_gradient_once_beside_the_batchnorm_sums():
    row = simulate("vit_small", "ddp", 8, 4, extra=SMALL)
    cfg = sim_config("vit_small", "ddp", 8, 4, extra=SMALL)
    assert row["state_gib"] == pytest.approx(row["theory_state_gib"], rel=0.01)
    model = step_traffic(cfg, "ddp", 8, 4)
    recorded = _recorded(row, 8)
    assert recorded["all_gather"] == (model["all_gather"].calls, model["all_gather"].bytes)  # the keys
    assert recorded["all_reduce"][1] == model["all_reduce"].bytes
    # DDP's first iteration reduces one bucket; the model counts the rebuilt ones of later steps
    bn = batchnorm_traffic(meta_model(cfg))
    assert recorded["all_reduce"][0] == bn.calls + 1 and model["all_reduce"].calls > bn.calls + 1


def test_the_peak_of_a_simulated_rank_is_reported_beside_the_estimate():
    row = simulate("vit_small", "single", 1, 4, extra=SMALL)
    assert row["collectives"] == [] and row["state_gib"] == pytest.approx(row["theory_state_gib"], rel=0.01)
    assert row["peak_gib"] > row["state_gib"] and row["estimate_gib"] > row["theory_state_gib"]


@pytest.mark.parametrize(("parallel", "world", "ac"), [
    ("ddp", 8, False),
    pytest.param("fsdp", 64, False, marks=pytest.mark.slow),  # ~20 s each
    pytest.param("ddp", 64, True, marks=pytest.mark.slow),
])  # fmt: skip
def test_the_simulated_peak_of_a_full_depth_vit_s_is_the_planned_memory_within_5_percent(parallel, world, ac):
    # The planner's memory (state + activations + autocast's weight copies + the layout's transient
    # buffers) against the peak the real step reaches on a simulated rank: ViT-S/16, 16 images.
    row = simulate("vit_small", parallel, world, 16, ac=ac)
    assert row["peak_gib"] == pytest.approx(row["planned_gib"], rel=0.05)


def test_deepspeed_is_refused_with_where_it_breaks():
    with pytest.raises(ValueError, match="analytic"):
        simulate("vit_small", "zero3", 8, 4, extra=SMALL)
