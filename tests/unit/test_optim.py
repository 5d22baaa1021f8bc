import math

import pytest
import torch
from torch import nn

from scale.models import build_moco
from scale.optim import LARS, Lamb, build_optimizer, cosine, lr_at, momentum_at, param_groups, weight_decay_at
from tests.helpers import TINY_HEADS, TINY_VIT


def test_param_groups_never_hold_frozen_params_and_exclusion_switch():
    model = build_moco("vit_small", **TINY_HEADS, **TINY_VIT)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    for exclude in (False, True):
        groups = param_groups(model, exclude)
        ids = [id(p) for g in groups for p in g["params"]]
        assert not frozen & set(ids) and len(ids) == len(set(ids))
        assert len(ids) == sum(1 for p in model.parameters() if p.requires_grad)
    assert len(param_groups(model, False)) == 1  # the authors': decay everything trainable
    decay, no_decay = param_groups(model, True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["wd_scale"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert "base_encoder.cls_token" in {names[id(p)] for p in no_decay["params"]}


def test_lr_schedule_closed_form():
    lr, W, T = 2.4e-3, 40, 300
    assert lr_at(0, lr, W, T) == 0.0
    assert lr_at(20, lr, W, T) == pytest.approx(lr / 2)
    assert lr_at(W, lr, W, T) == pytest.approx(lr)  # warmup end
    mid = W + (T - W) // 2
    assert lr_at(mid, lr, W, T) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (mid - W) / (T - W))))
    assert lr_at(T - 1, lr, W, T) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (T - 1 - W) / (T - W))))
    assert lr_at(T, lr, W, T) == pytest.approx(0.0, abs=1e-15)


def test_momentum_and_weight_decay_schedules():
    assert momentum_at(0, 100) == pytest.approx(0.99) and momentum_at(100, 100) == pytest.approx(1.0)
    assert momentum_at(50, 100) == pytest.approx(0.995)
    assert weight_decay_at(37, 0.1, None, 100) == 0.1
    assert weight_decay_at(0, 0.04, 0.4, 100) == pytest.approx(0.04) and weight_decay_at(100, 0.04, 0.4, 100) == 0.4
    assert cosine(0.5, 1.0, 0.0) == pytest.approx(0.5)


def test_lars_follows_the_authors_update():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([0.5])
    opt = LARS([w, b], lr=0.1, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    dp = torch.tensor([[1.0, 0.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])  # grad + wd * w
    q = 0.001 * 5.0 / dp.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * q * dp)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 0.5]))  # 1-d: no wd, no trust ratio


def test_lamb_first_step_is_the_trust_scaled_adam_direction():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    w0 = w.detach().clone()
    w.grad = torch.randn(4, 3)
    Lamb([w], lr=0.01, weight_decay=0.01, eps=1e-6).step()
    update = w.grad / (w.grad.abs() + 1e-6) + 0.01 * w0  # m_hat / (sqrt(v_hat) + eps) at step 1
    expected = w0 - 0.01 * (w0.norm() / update.norm()) * update
    torch.testing.assert_close(w.detach(), expected)


def test_optimizer_choice_on_cpu_is_logged_and_checked():
    model = nn.Linear(3, 3)
    groups = param_groups(model)
    assert build_optimizer("adamw", groups, 1e-3, 0.1)[1] == "torch AdamW (foreach)"
    assert build_optimizer("lamb", groups, 1e-3, 0.1)[1] == "scale Lamb (pure torch)"
    assert build_optimizer("lars", groups, 1e-3, 0.1)[1].startswith("scale LARS")
    with pytest.raises(ValueError, match="needs CUDA"):
        build_optimizer("lamb", groups, 1e-3, 0.1, implementation="deepspeed")
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adam", groups, 1e-3, 0.1)


def test_torch_fused_adamw_on_cpu_matches_foreach():
    torch.manual_seed(0)
    params = {k: [nn.Parameter(torch.randn(64, 32)), nn.Parameter(torch.randn(32))] for k in ("foreach", "fused")}
    params["fused"] = [nn.Parameter(p.detach().clone()) for p in params["foreach"]]
    opts = {k: build_optimizer("adamw", [{"params": params[k]}], 1e-2, 0.1, implementation=impl)
            for k, impl in (("foreach", "torch"), ("fused", "torch-fused"))}  # fmt: skip
    assert opts["fused"][1] == "torch AdamW (fused)" and opts["foreach"][1] == "torch AdamW (foreach)"
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params["foreach"]]
        for k in opts:
            for p, g in zip(params[k], grads, strict=True):
                p.grad = g.clone()
            opts[k][0].step()
    for a, b in zip(params["foreach"], params["fused"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
