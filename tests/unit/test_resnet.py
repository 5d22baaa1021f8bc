"""MoCo v3 with ResNet-50 equals the authors' code (facebookresearch/moco-v3: `moco/builder.py`
`MoCo_ResNet`, `moco/optimizer.py` `LARS`, `main_moco.py`'s schedules), transcribed below for one
process; its FLOPs, memory, checkpoints and configuration."""

import math
from functools import partial

import pytest
import torch
import torchvision
from torch import nn

from scale.config import Config, ConfigError, apply_overrides
from scale.models import MoCoV3, build_backbone, build_moco
from scale.models.flops import PAPER_TABLE3_GMACS, counted_macs, moco_training_flops, resnet_convs, resnet_macs
from scale.models.formats import (
    export_timm_state_dict,
    export_torchvision_state_dict,
    load_backbone,
    load_moco_checkpoint,
    official_state,
)
from scale.models.resnet import resolve_resnet_config
from scale.optim import LARS, lr_at, momentum_at, param_groups
from scale.optim.optimizers import supports_device_skip
from scale.preflight import preflight
from scale.recipes import get_recipe
from scale.train.memory import activation_bytes

# ----------------------------------------------------------------------------- the authors' code


class AuthorsMoCo(nn.Module):
    """`moco/builder.py` `MoCo` + `MoCo_ResNet`, one process (concat_all_gather is the identity,
    rank 0), no `.cuda()`."""

    def __init__(self, base_encoder, dim=256, mlp_dim=4096, T=1.0):
        super().__init__()
        self.T = T
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        hidden_dim = self.base_encoder.fc.weight.shape[1]
        del self.base_encoder.fc, self.momentum_encoder.fc
        self.base_encoder.fc = self._build_mlp(2, hidden_dim, mlp_dim, dim)
        self.momentum_encoder.fc = self._build_mlp(2, hidden_dim, mlp_dim, dim)
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim, False)
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True):
            param_m.data.copy_(param_b.data)
            param_m.requires_grad = False

    def _build_mlp(self, num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
        mlp = []
        for i in range(num_layers):
            dim1 = input_dim if i == 0 else mlp_dim
            dim2 = output_dim if i == num_layers - 1 else mlp_dim
            mlp.append(nn.Linear(dim1, dim2, bias=False))
            if i < num_layers - 1:
                mlp.append(nn.BatchNorm1d(dim2))
                mlp.append(nn.ReLU(inplace=True))
            elif last_bn:
                mlp.append(nn.BatchNorm1d(dim2, affine=False))
        return nn.Sequential(*mlp)

    @torch.no_grad()
    def _update_momentum_encoder(self, m):
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)

    def contrastive_loss(self, q, k):
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        N = logits.shape[0]
        labels = torch.arange(N, dtype=torch.long) + N * 0
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1, x2, m):
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class AuthorsLARS(torch.optim.Optimizer):
    """`moco/optimizer.py`."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))  # fmt: skip

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (g["trust_coefficient"] * param_norm / update_norm),
                                                one), one)  # fmt: skip
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def authors_lr(epoch, lr, warmup_epochs, epochs):
    """`main_moco.py` `adjust_learning_rate`."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def authors_momentum(epoch, moco_m, epochs):
    """`main_moco.py` `adjust_moco_momentum`."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


HEADS = dict(dim=32, mlp_dim=128)


def authors_and_ours(arch="resnet50"):
    torch.manual_seed(0)
    authors = AuthorsMoCo(partial(getattr(torchvision.models, arch), zero_init_residual=True), T=1.0, **HEADS)
    with torch.no_grad():  # away from the initial values, so that every parameter and buffer is tested
        for name, t in authors.state_dict().items():
            if t.is_floating_point() and "momentum_encoder" not in name:
                t.add_(torch.randn_like(t) * 0.01 if "running_var" not in name else torch.rand_like(t))
        for b, m in zip(authors.base_encoder.state_dict().values(), authors.momentum_encoder.state_dict().values(),
                        strict=True):  # fmt: skip
            m.copy_(b + 0.01 * torch.randn_like(b) if b.is_floating_point() else b)
    ours = build_moco(arch, temperature=1.0, **HEADS)
    # The authors' checkpoint format, as main_moco.py saves it from DDP.
    release = {"epoch": 1, "arch": arch, "state_dict": {f"module.{k}": v for k, v in authors.state_dict().items()}}
    load_moco_checkpoint(ours, release)
    return authors, ours, release


def views(batch=8, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


# ----------------------------------------------------------------------------- equality


def test_model_is_the_authors_moco_resnet_module_for_module():
    authors, ours, _ = authors_and_ours()
    assert sorted(ours.state_dict()) == sorted(authors.state_dict())  # same keys: their checkpoints load
    assert [type(m) for m in ours.base_encoder.fc] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in ours.predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no last BN
    assert ours.base_encoder.fc[-1].affine is False
    assert not ours.joint_views  # every BatchNorm mixes samples: one forward per view
    # zero_init_residual, as main_moco.py builds it
    fresh = build_backbone("resnet50")
    assert all(torch.count_nonzero(block.bn3.weight) == 0 for stage in (fresh.layer1, fresh.layer4) for block in stage)


@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_loss_and_gradients_equal_the_authors_moco_resnet(dtype):
    """In fp64 every difference of arithmetic shows (1e-10); in fp32 the two differ only by the
    rounding of einsum against a matmul in the logits, carried through 50 layers' backward."""
    authors, ours, _ = authors_and_ours()
    authors.to(dtype), ours.to(dtype)
    x1, x2 = (x.to(dtype) for x in views(8, 32))
    m = 0.99
    loss_a = authors(x1, x2, m)
    loss_o = ours(x1, x2, momentum=m)
    loss_a.backward()
    loss_o.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(loss_o, loss_a, rtol=tol, atol=0)
    grads_a = {n: p.grad for n, p in authors.named_parameters() if p.grad is not None}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads_a.keys() == grads_o.keys() and len(grads_a) == 159 + 4 + 4  # backbone, projector, predictor
    for name, g in grads_a.items():  # relative to the tensor's largest gradient
        scale = g.abs().max().item()
        torch.testing.assert_close(grads_o[name], g, rtol=0, atol=scale * (tol if dtype == torch.float64 else 1e-5),
                                   msg=name)  # fmt: skip
    # the momentum update ran first in both, over every parameter; BatchNorm statistics per view
    mine = ours.state_dict()
    for name, a in authors.state_dict().items():
        torch.testing.assert_close(mine[name], a, rtol=tol, atol=1e-12 if dtype == torch.float64 else 1e-7, msg=name)


def test_lars_equals_the_authors_step_for_step():
    _, ours, _ = authors_and_ours("resnet18")
    twin = build_moco("resnet18", temperature=1.0, **HEADS)
    twin.load_state_dict(ours.state_dict())
    lr, wd = 0.3 * 4096 / 256, 1.5e-6
    mine = LARS(param_groups(ours, exclude_norm_bias=False), lr=lr, weight_decay=wd, momentum=0.9)
    theirs = AuthorsLARS(twin.parameters(), lr=lr, weight_decay=wd, momentum=0.9)  # main_moco.py: every parameter
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p, q in zip(ours.parameters(), twin.parameters(), strict=True):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
        mine.step()
        theirs.step()
    for (name, p), q in zip(ours.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    norms = [p for p in ours.parameters() if p.ndim == 1 and p.requires_grad]
    assert norms  # BatchNorm scales and shifts: no weight decay, no trust ratio (the plain momentum-SGD step)


def test_lars_skips_a_non_finite_step_on_the_device():
    """The trainer's device-side skip (`found_inf`, no host sync): a kept step is the plain one bit
    for bit; a skipped one leaves the weights and momentum buffers as they were."""
    torch.manual_seed(0)
    w = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    twin = [nn.Parameter(t.detach().clone()) for t in w]
    ours, plain = LARS(w, lr=0.5, weight_decay=0.1), LARS(twin, lr=0.5, weight_decay=0.1)
    assert supports_device_skip(ours)
    for skip in (0.0, 0.0, 1.0, 0.0):
        grads = [torch.randn_like(t) for t in w]
        if skip:
            grads[0][0, 0] = float("nan")
        before = [t.detach().clone() for t in w], [ours.state[t]["mu"].clone() for t in w if t in ours.state]
        for t, u, gr in zip(w, twin, grads, strict=True):
            t.grad, u.grad = gr.clone(), gr.clone()
        ours.found_inf, ours.grad_scale = torch.tensor(skip), None
        ours.step()
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(w, before[0], strict=True))
            assert all(torch.equal(ours.state[t]["mu"], m) for t, m in zip(w, before[1], strict=True))
            continue
        plain.step()
        assert all(torch.equal(a, b) for a, b in zip(w, twin, strict=True))


def test_schedules_equal_the_authors():
    recipe = get_recipe("r50_1000ep")
    epochs, warmup, iters = recipe.schedule.epochs, recipe.schedule.warmup_epochs, 312
    total, lr = epochs * iters, recipe.optim.base_lr * 4096 / 256
    for step in (0, 1, 1500, 3120, 3121, 100_000, total - 1):
        epoch = step / iters  # main_moco.py: epoch + i / iters_per_epoch
        assert lr_at(step, lr, warmup * iters, total) == pytest.approx(authors_lr(epoch, lr, warmup, epochs), rel=1e-12)
        assert momentum_at(step, total, recipe.schedule.momentum) == pytest.approx(
            authors_momentum(epoch, 0.996, epochs), rel=1e-12
        )


@pytest.mark.parametrize(
    "name, epochs, base_lr, wd, m",
    [("r50_100ep", 100, 0.6, 1e-6, 0.99), ("r50_300ep", 300, 0.3, 1e-6, 0.99),
     ("r50_800ep", 800, 0.3, 1.5e-6, 0.996), ("r50_1000ep", 1000, 0.3, 1.5e-6, 0.996)],
)  # fmt: skip
def test_recipes_are_the_authors_commands(name, epochs, base_lr, wd, m):
    cfg = get_recipe(name)
    assert (cfg.model.name, cfg.model.temperature, cfg.optim.name) == ("resnet50", 1.0, "lars")
    assert (cfg.schedule.epochs, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.schedule.momentum) == (
        epochs, base_lr, wd, m)  # fmt: skip
    assert (cfg.schedule.warmup_epochs, cfg.data.crop_min, cfg.batch.global_batch_size) == (10, 0.2, 4096)
    assert (cfg.optim.momentum, cfg.optim.trust_coefficient, cfg.optim.exclude_norm_bias_from_wd) == (0.9, 1e-3, False)
    preflight(cfg, world_size=16, data=False)  # the authors' 16 GPUs


# ----------------------------------------------------------------------------- FLOPs and memory


def test_flops_are_the_papers_resnet50_reference():
    cfg = resolve_resnet_config("resnet50")
    assert resnet_macs(cfg) == counted_macs(cfg)  # the analytic walk counts what the module executes
    assert resnet_macs(cfg) / 1e9 == pytest.approx(PAPER_TABLE3_GMACS["resnet50"], abs=0.05)  # Table 3: 4.1 G
    flops = moco_training_flops(cfg)
    assert flops.backbone == 16 * resnet_macs(cfg)
    assert flops.projector == 16 * (2048 * 4096 + 4096 * 256)  # 2 layers, as MoCo_ResNet
    for name, size in (("resnet18", 96), ("resnet101", 64)):
        small = resolve_resnet_config(name, img_size=size)
        assert resnet_macs(small) == counted_macs(small)


def _saved_bytes(model: nn.Module, xs) -> int:
    """Bytes of the tensors autograd keeps for the backward (parameters aside), each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for x in xs:
            model.pooled_features(x)
    return sum(seen.values())


@pytest.mark.parametrize("name, size", [("resnet50", 64), ("resnet18", 96)])
def test_activation_memory_is_what_the_forward_keeps(name, size):
    torch.manual_seed(0)
    model = build_backbone(name, img_size=size)
    batch = 8
    measured = _saved_bytes(model, views(batch, size))
    transient = (
        batch * (14 + 2 * 4) * max(c.outputs for c in resnet_convs(model.cfg))
    )  # the peak's BatchNorm arithmetic
    planned = activation_bytes(model.cfg, batch, "fp32", False) - transient
    assert measured == pytest.approx(planned, rel=0.02)
    bf16 = activation_bytes(model.cfg, batch, "bf16", False) - transient * 18 / 22
    assert planned / 2 < bf16 < 0.56 * planned  # the pool's int64 indices
    assert activation_bytes(model.cfg, batch, "fp32", True) < activation_bytes(model.cfg, batch, "fp32", "selective")
    assert activation_bytes(model.cfg, batch, "fp32", "selective") < planned + transient


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_round_trip_in_the_authors_layout(tmp_path):
    authors, ours, _ = authors_and_ours("resnet18")
    out = official_state(ours, epoch=3, arch="resnet18")
    assert set(out) == {"epoch", "arch", "state_dict"} and all(k.startswith("module.") for k in out["state_dict"])
    back = AuthorsMoCo(partial(torchvision.models.resnet18, zero_init_residual=True), **HEADS)
    back.load_state_dict({k.removeprefix("module."): v for k, v in out["state_dict"].items()}, strict=True)
    for (name, a), b in zip(authors.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_torchvision_loads_the_export_strictly_and_computes_the_same():
    _, ours, release = authors_and_ours()
    export = export_torchvision_state_dict(ours)
    assert not any(k.startswith("fc.") for k in export)
    tv = torchvision.models.resnet50()
    tv.fc = nn.Identity()
    tv.load_state_dict(export, strict=True)
    with_classifier = torchvision.models.resnet50(num_classes=10)
    with_classifier.load_state_dict(export_torchvision_state_dict(ours, num_classes=10), strict=True)
    assert torch.count_nonzero(with_classifier.fc.weight) == 0
    x = views(4)[0]
    tv.eval(), ours.base_encoder.eval()
    torch.testing.assert_close(tv(x), ours.base_encoder.pooled_features(x))
    assert export_timm_state_dict(ours).keys() == export.keys()
    # The authors' release loads as a frozen backbone (the linear probe's path), projector dropped.
    backbone = build_backbone("resnet50")
    load_backbone(backbone, release)
    torch.testing.assert_close(backbone.eval()(x), tv(x))


def test_backbone_loader_reads_the_authors_release_by_its_arch(tmp_path):
    from scale.eval.backbone import load_frozen_backbone

    _, ours, release = authors_and_ours("resnet18")
    path = tmp_path / "r-18.pth.tar"
    torch.save(release, path)
    loaded = load_frozen_backbone(path)
    assert (loaded.kind, loaded.name, loaded.model.num_features) == ("moco", "resnet18", 512)
    tv_path = tmp_path / "tv.pth"
    torch.save(export_torchvision_state_dict(ours), tv_path)
    assert load_frozen_backbone(tv_path, model="resnet18").kind == "torchvision"


# ----------------------------------------------------------------------------- configuration


def _check(*overrides: str) -> None:
    preflight(apply_overrides(Config(), ["--model.name=resnet50", *overrides]), world_size=1, data=False)


def test_vit_options_and_unknown_names_are_one_line_errors():
    with pytest.raises(ConfigError, match="patch_size=16.*ViT options, which resnet50 does not have"):
        _check("--model.patch_size=16")
    with pytest.raises(ConfigError, match="pool='avg'"):
        _check("--model.pool=avg")
    with pytest.raises(ConfigError, match="joint.*ResNet"):
        _check("--model.view_forward=joint")
    with pytest.raises(ValueError, match="unknown ResNet 'resnet51'.*resnet50"):
        resolve_resnet_config("resnet51")
    with pytest.raises(ValueError, match="unknown ViT model 'resnt50'"):
        build_backbone("resnt50")
    assert isinstance(build_moco("r50", **HEADS), MoCoV3)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputed_stages_give_the_same_loss_gradients_and_statistics(mode):
    """Activation recompute of the four stages (`ResNetLayout.blocks`): the same loss and gradients,
    and the BatchNorms' running statistics move once per forward, not again in the recompute."""
    from scale.parallel.recompute import apply_activation_checkpointing
    from scale.train.parallelize import recomputed_blocks

    torch.manual_seed(0)
    plain = build_moco("resnet18", temperature=1.0, **HEADS)
    recomputed = build_moco("resnet18", temperature=1.0, **HEADS)
    recomputed.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(recomputed_blocks(recomputed), selective=mode == "selective") == 4
    x1, x2 = views(8, 32)
    for model in (plain, recomputed):
        model(x1, x2, momentum=0.99).backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    for (name, a), b in zip(plain.named_buffers(), recomputed.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
