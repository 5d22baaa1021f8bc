import math

import pytest
import torch
from torch import nn

from scale.models import build_moco
from scale.optim import (
    LARS,
    Lamb,
    build_optimizer,
    cosine,
    lr_at,
    momentum_at,
    param_groups,
    supports_device_skip,
    weight_decay_at,
)
from scale.optim import optimizers as optimizers_module
from tests.helpers import TINY_HEADS, TINY_VIT, run_ranks


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
    opt, what = build_optimizer("adamw", groups, 1e-3, 0.1)
    assert what == "torch AdamW (fused)" and supports_device_skip(opt)  # fused on CPU too: 4x faster here
    assert build_optimizer("adamw", groups, 1e-3, 0.1, implementation="torch")[1] == "torch AdamW (foreach)"
    assert build_optimizer("lamb", groups, 1e-3, 0.1)[1] == "scale Lamb (foreach)"
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


class LambBefore(torch.optim.Optimizer):
    """scale's Lamb as it was before the foreach implementation (per tensor, int step): the reference."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * trust, alpha=-group["lr"])


SHAPES = [(64, 32), (32,), (96, 64), (7,), (1, 5)]


def _lamb_run(make, steps=20, found_inf=None, chunk=None, monkeypatch=None):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(*s)) for s in SHAPES]
    params[3].data.zero_()  # a zero-norm tensor: trust ratio 1
    opt = make([{"params": params[:3], "weight_decay": 0.05}, {"params": params[3:], "weight_decay": 0.0}])
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        if found_inf is not None:
            opt.found_inf = torch.tensor(float(found_inf(i)))
            if found_inf(i):
                params[0].grad[0, 0] = float("nan")
                params[2].grad[1, 1] = float("inf")
        opt.step()
        opt.__dict__.pop("found_inf", None)
    return params, opt


@pytest.mark.parametrize("chunk", [1 << 24, 3000])  # one chunk, and several
def test_foreach_lamb_equals_the_per_tensor_lamb_of_before(chunk, monkeypatch):
    monkeypatch.setattr(optimizers_module, "FOREACH_CHUNK_NUMEL", chunk)
    monkeypatch.setattr(optimizers_module.foreach_chunks, "__defaults__", (chunk,))
    before, _ = _lamb_run(lambda g: LambBefore(g, lr=0.01))
    foreach, opt = _lamb_run(lambda g: Lamb(g, lr=0.01))
    single, _ = _lamb_run(lambda g: Lamb(g, lr=0.01, foreach=False))
    for a, b, c in zip(before, foreach, single, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)
    assert float(opt.state[foreach[0]]["step"]) == 20


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_found_inf_skips_on_the_device_leaving_weights_moments_and_step(foreach):
    """found_inf = 1 (a non-finite step, NaN/inf gradients) changes nothing; the other steps are
    the steps of a run without the skipped ones."""
    skip = lambda i: i in (0, 5, 6)  # the first step too: bias corrections start at the first applied one
    masked, opt = _lamb_run(lambda g: Lamb(g, lr=0.01, foreach=foreach), found_inf=skip)
    assert float(opt.state[masked[0]]["step"]) == 17
    assert all(torch.isfinite(p).all() for p in masked)
    assert all(torch.isfinite(s["exp_avg_sq"]).all() for s in opt.state.values())

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(*s)) for s in SHAPES]
    params[3].data.zero_()
    ref = LambBefore([{"params": params[:3], "weight_decay": 0.05}, {"params": params[3:], "weight_decay": 0.0}],
                     lr=0.01)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for i in range(20):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        if skip(i):
            continue
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        ref.step()
    for a, b in zip(params, masked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_lamb_resumes_a_checkpoint_of_the_per_tensor_lamb():
    params, opt = _lamb_run(lambda g: LambBefore(g, lr=0.01), steps=3)
    state = opt.state_dict()
    assert state["state"][0]["step"] == 3  # int, as before
    new = Lamb([{"params": params[:3], "weight_decay": 0.05}, {"params": params[3:], "weight_decay": 0.0}], lr=0.01)
    new.load_state_dict(state)
    for p in params:
        p.grad = torch.ones_like(p)
    new.step()
    assert float(new.state[params[0]]["step"]) == 4


def test_auto_on_cuda_picks_torch_fused_adamw_and_scales_lamb(monkeypatch):
    """On GPUs (CUDA mocked: the choice only) auto takes the implementations proven equal: torch's
    fused AdamW for every backend (not DeepSpeed's FusedAdam, which compiles with nvcc at first use)
    and scale's Lamb (not apex/DeepSpeed's fused LAMB)."""
    monkeypatch.setattr(optimizers_module, "_on_cuda", lambda groups: True)
    groups = param_groups(nn.Linear(3, 3))
    opt, what = build_optimizer("adamw", groups, 1e-3, 0.1)
    assert what == "torch AdamW (fused)" and opt.defaults["fused"] and supports_device_skip(opt)
    opt, what = build_optimizer("lamb", groups, 1e-3, 0.1)
    assert what == "scale Lamb (foreach)" and isinstance(opt, Lamb) and supports_device_skip(opt)
    assert not supports_device_skip(build_optimizer("adamw", groups, 1e-3, 0.1, implementation="torch")[0])
    assert supports_device_skip(build_optimizer("lars", groups, 1e-3, 0.1)[0])  # LARS reads found_inf too
    with pytest.raises(ValueError, match="LAMB implementations"):
        build_optimizer("lamb", groups, 1e-3, 0.1, implementation="torch")


def test_deepspeed_backend_on_a_gpu_leaves_the_choice_to_auto(monkeypatch):
    """The DeepSpeed backend no longer prefers FusedAdam on GPUs (CUDA mocked)."""
    from scale.parallel.deepspeed import DeepSpeedBackend

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    backend = DeepSpeedBackend("ds_configs/zero2.json", "bf16", device=torch.device("cuda", 0))
    assert getattr(backend, "preferred_optimizer", None) is None


def _fused_lamb_on_dtensors(rank, world):
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    fully_shard(model)
    groups = param_groups(model)
    assert optimizers_module._has_dtensor(groups)
    optimizers_module._on_cuda = lambda groups: True  # the choice as on a GPU (this process only)
    assert build_optimizer("lamb", groups, 1e-3, 0.1)[1] == "scale Lamb (foreach)"
    for impl in ("apex", "deepspeed"):
        with pytest.raises(ValueError, match="per shard"):
            build_optimizer("lamb", groups, 1e-3, 0.1, implementation=impl)
    with pytest.raises(ValueError, match="DTensor"):
        build_optimizer("adamw", groups, 1e-3, 0.1, implementation="deepspeed")


@pytest.mark.distributed
def test_auto_never_picks_a_fused_lamb_for_fsdp2_dtensors_and_asking_is_an_error():
    run_ranks(_fused_lamb_on_dtensors, 1)
