import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scale.models
from scale.models import MoCoV3, build_moco
from scale.optim import momentum_at
from tests.helpers import TINY_HEADS, TINY_VIT


def tiny_moco(**overrides) -> MoCoV3:
    return build_moco("vit_small", **TINY_HEADS, **TINY_VIT, **overrides)


def views(batch: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randn(batch, 3, 32, 32, generator=g)


def test_heads_are_the_authors_mlps():
    with torch.device("meta"):
        model = build_moco("vit_base")
    proj, pred = model.base_encoder.head, model.predictor
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    linears = [m for m in [*proj, *pred] if isinstance(m, nn.Linear)]
    assert all(m.bias is None for m in linears)
    assert [(m.in_features, m.out_features) for m in linears] == [
        (768, 4096), (4096, 4096), (4096, 256), (256, 4096), (4096, 256)
    ]  # fmt: skip
    assert proj[-1].affine is False and pred[-1].affine is False
    assert proj[1].affine and pred[1].affine
    assert model.temperature == 0.2


def test_momentum_encoder_is_a_frozen_copy_without_predictor():
    model = tiny_moco()
    base, mom = model.base_encoder.state_dict(), model.momentum_encoder.state_dict()
    assert base.keys() == mom.keys()
    assert all(torch.equal(base[k], mom[k]) for k in base)
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    assert not any("predictor" in n for n, _ in model.momentum_encoder.named_modules())
    assert not any(n.startswith("head.") and "predictor" in n for n in mom)


def test_momentum_update_follows_the_formula_and_skips_frozen():
    model = tiny_moco()
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    m = 0.9
    q = {n: p.detach().clone() for n, p in model.base_encoder.named_parameters()}
    k = {n: p.detach().clone() for n, p in model.momentum_encoder.named_parameters()}
    model.momentum_update(m)
    after = dict(model.momentum_encoder.named_parameters())
    for name, p in model.base_encoder.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(after[name], m * k[name] + (1 - m) * q[name], rtol=0, atol=1e-6)
        else:  # random patch projection and the sin-cos table stay bitwise equal
            assert torch.equal(after[name], q[name]), name
    assert "patch_embed.proj.weight" in q and "pos_embed" in q


def reference_loss(model: MoCoV3, x1, x2) -> torch.Tensor:
    """Paper Algorithm 1 transcribed directly, one process."""

    def ctr(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", q, k) / model.temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * model.temperature

    q1, q2 = model.predictor(model.base_encoder(x1)), model.predictor(model.base_encoder(x2))
    with torch.no_grad():
        k1, k2 = model.momentum_encoder(x1), model.momentum_encoder(x2)
    return ctr(q1, k2) + ctr(q2, k1)


def test_forward_is_algorithm_1_with_momentum_update_first():
    model = tiny_moco()
    x1, x2 = views()
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p)) if p.requires_grad else None
    expected_model = tiny_moco()
    expected_model.load_state_dict(model.state_dict())
    expected_model.momentum_update(0.5)
    expected = reference_loss(expected_model, x1, x2)
    loss = model(x1, x2, momentum=0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(model.momentum_encoder.parameters(), expected_model.momentum_encoder.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradients_reach_query_side_only():
    model = tiny_moco()
    loss = model(*views(), momentum=0.99)
    loss.backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert model.base_encoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.base_encoder.patch_embed.proj.weight.grad is None


def test_loss_bounds_and_scale():
    # Perfectly aligned keys give the minimum; each term is CE * 2 tau, so the sum is at least 0
    # and the loss of uniform logits is 2 * (2 tau * log B).
    model = tiny_moco()
    q = torch.randn(8, 16)
    assert model.contrastive_loss(q, q) < model.contrastive_loss(q, torch.randn(8, 16))
    uniform = model.contrastive_loss(torch.zeros(8, 16) + 1.0, torch.ones(8, 16))
    torch.testing.assert_close(uniform, torch.tensor(2 * 0.2 * math.log(8)))


def test_momentum_at_closed_form():
    assert momentum_at(0, 100) == pytest.approx(0.99)
    assert momentum_at(50, 100) == pytest.approx(0.995)
    assert momentum_at(100, 100) == pytest.approx(1.0)
    t, T = 37, 300
    assert momentum_at(t, T) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * t / T)) * (1 - 0.99))
    with pytest.raises(ValueError):
        momentum_at(0, 0)


def test_models_package_has_no_distributed_import_or_cuda_calls():
    root = Path(scale.models.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("torch.distributed") for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("torch.distributed"), path
            elif isinstance(node, ast.Attribute):
                assert node.attr not in ("cuda", "distributed"), f"{path}:{node.lineno}"


def test_loss_runs_in_fp32_under_bf16_autocast():
    model = tiny_moco()
    q, k = torch.randn(8, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.contrastive_loss(q, k)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, model.contrastive_loss(q.float(), k.float()))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_joint_views_equal_per_view_forwards_in_one_process(checkpointing):
    from scale.parallel.recompute import apply_activation_checkpointing

    losses, grads, buffers = {}, {}, {}
    both = torch.randn(2, 8, 3, 32, 32)  # the loaders' layout: one buffer, view 1 then view 2
    for mode in ("per_view", "joint"):
        torch.manual_seed(0)
        model = build_moco("vit_small", **TINY_HEADS, **TINY_VIT, view_forward=mode)
        assert model.joint_views == (mode == "joint")
        if checkpointing:
            apply_activation_checkpointing(model.base_encoder.blocks)
        loss = model(both[0], both[1], momentum=0.99)
        loss.backward()
        losses[mode], grads[mode] = float(loss.detach()), _grads(model)
        buffers[mode] = [b.clone() for b in model.buffers()]
    assert losses["joint"] == pytest.approx(losses["per_view"], rel=1e-6)
    scale = max(float(g.abs().max()) for g in grads["per_view"].values())
    for name, g in grads["per_view"].items():
        torch.testing.assert_close(grads["joint"][name], g, rtol=1e-5, atol=1e-6 * scale, msg=name)
    for b_joint, b_view in zip(buffers["joint"], buffers["per_view"], strict=True):
        torch.testing.assert_close(b_joint, b_view, rtol=1e-6, atol=1e-7)


def test_joint_views_are_the_default_for_plain_vits_only():
    assert build_moco("vit_small", **TINY_HEADS, **TINY_VIT).joint_views
    # BatchNorm in the blocks (ViT-BN) or in the conv stem mixes samples: per view, whatever 'auto' says.
    assert not build_moco("vit_small", **TINY_HEADS, **TINY_VIT, use_bn=True).joint_views
    tiny_stem = {**TINY_VIT, "patch_size": 16, "embed_dim": 32, "depth": 2}
    assert not build_moco("vit_small", **TINY_HEADS, **tiny_stem, conv_stem=True).joint_views
    with pytest.raises(ValueError, match="view_forward=joint would compute this backbone's BatchNorm"):
        build_moco("vit_small", **TINY_HEADS, **TINY_VIT, use_bn=True, view_forward="joint")


def test_the_joint_batch_is_a_view_of_adjacent_halves_and_a_copy_otherwise():
    from scale.views import adjacent, join_views, views_to

    both = torch.randn(2, 4, 3, 8, 8)
    joint = join_views(both[0], both[1])
    assert joint.data_ptr() == both.data_ptr() and joint.shape == (8, 3, 8, 8)
    assert torch.equal(joint, both.reshape(8, 3, 8, 8))
    assert not adjacent(both[1], both[0])  # out of order: copied, in the given order
    swapped = join_views(both[1], both[0])
    assert swapped.data_ptr() != both.data_ptr() and torch.equal(swapped[:4], both[1])
    a, b = views_to((both[0], both[1]), torch.device("cpu"), torch.float64)  # one cast: adjacent again
    assert a.dtype == torch.float64 and adjacent(a, b) and torch.equal(b, both[1].double())


def test_the_monitor_tap_sees_each_view_in_order_under_joint_views():
    model = build_moco("vit_small", **TINY_HEADS, **TINY_VIT)
    tapped = []
    model.base_encoder.feature_sink = tapped.append
    both = torch.randn(2, 4, 3, 32, 32)
    model(both[0], both[1])
    assert len(tapped) == 2
    with torch.no_grad():
        torch.testing.assert_close(tapped[0], model.base_encoder.pooled_features(both[0]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tapped[1], model.base_encoder.pooled_features(both[1]), rtol=1e-5, atol=1e-6)
