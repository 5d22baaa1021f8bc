import pytest
import torch

from scale.models import VIT_PRESETS, build_vit, resolve_vit_config
from scale.models.flops import (
    PAPER_TABLE3_GMACS,
    counted_macs,
    head_macs,
    moco_training_flops,
    vit_macs,
)


@pytest.mark.parametrize("name", sorted(n for n in PAPER_TABLE3_GMACS if n.startswith("vit")))  # test_resnet.py
def test_macs_within_half_a_percent_of_table3(name):
    macs = vit_macs(resolve_vit_config(name)).total
    assert abs(macs / (PAPER_TABLE3_GMACS[name] * 1e9) - 1) < 0.005


@pytest.mark.parametrize(
    "name, overrides",
    [(n, {}) for n in sorted(VIT_PRESETS)]
    + [("vit_small", {"pool": "avg"}), ("vit_small", {"conv_stem": True}), ("vit_base", {"img_size": 160})],
)
def test_analytic_macs_equal_flop_counter_on_meta(name, overrides):
    cfg = resolve_vit_config(name, **overrides)
    assert vit_macs(cfg).total == counted_macs(cfg)


def test_patch7_is_about_six_times_patch16():
    ratio = vit_macs(resolve_vit_config("vit_bn_large_p7")).total / vit_macs(resolve_vit_config("vit_large")).total
    assert 5.5 < ratio < 6.5  # paper Sec. 6: "increases FLOPs to ~6x"


@pytest.mark.parametrize("name", sorted(n for n in PAPER_TABLE3_GMACS if n.startswith("vit")))  # test_resnet.py
def test_training_flops_are_16x_macs_plus_small_heads(name):
    cfg = resolve_vit_config(name)
    flops = moco_training_flops(cfg)
    assert flops.backbone == 16 * vit_macs(cfg).total
    heads = head_macs(cfg.embed_dim)
    assert flops.heads == 16 * heads.projector + 12 * heads.predictor
    assert flops.heads / flops.total < 0.005  # paper: heads add under 0.5%


def test_head_macs_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from scale.models import build_mlp

    heads = head_macs(384)
    with torch.device("meta"):
        proj, pred = build_mlp(3, 384, 4096, 256), build_mlp(2, 256, 4096, 256)
        with FlopCounterMode(display=False) as fc:
            proj(torch.empty(2, 384))
        assert fc.get_total_flops() // 4 == heads.projector
        with FlopCounterMode(display=False) as fc:
            pred(torch.empty(2, 256))
        assert fc.get_total_flops() // 4 == heads.predictor


def test_tiny_model_counted_on_real_tensors_with_math_attention():
    # FlopCounterMode misses fused CPU attention; with the math path it sees everything.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_vit("vit_small", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert fc.get_total_flops() // 2 == vit_macs(model.cfg).total
