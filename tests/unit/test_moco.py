import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scale.models
from scale.models import MoCoV3, build_moco, momentum_schedule
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


def test_momentum_schedule_closed_form():
    assert momentum_schedule(0, 100) == pytest.approx(0.99)
    assert momentum_schedule(50, 100) == pytest.approx(0.995)
    assert momentum_schedule(100, 100) == pytest.approx(1.0)
    t, T = 37, 300
    assert momentum_schedule(t, T) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * t / T)) * (1 - 0.99))
    with pytest.raises(ValueError):
        momentum_schedule(0, 0)


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
