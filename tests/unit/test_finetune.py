"""Fine-tuning's parts against timm's references (mixup / cutmix, label smoothing, model EMA, drop
path, layer-wise lr decay), its data stream (repeated augmentation, determinism), the trainer's
exact resume with the real loader, and the entry point's one-line errors."""

import json

import numpy as np
import pytest
import torch

from scale.config import Config
from scale.data.finetune import BatchMixer, FinetuneAugment, FinetuneLoader
from scale.models import build_backbone, build_vit
from scale.models.classifier import Classifier
from scale.optim import layer_decay_scale, param_groups, set_lr_wd
from scale.parallel.base import SingleProcess
from tests.helpers import read_metrics, tiny_config


def tiny_finetune_config(out_dir, name="ft", **overrides) -> Config:
    """The tests' tiny ViT (`tiny_config`) fine-tuned on the bundled digits (32 px) with the DeiT
    recipe's parts all on."""
    settings = {
        "data.source": "demo", "data.eval_source": "demo:val", "data.num_workers": 0, "data.shuffle_buffer": 50,
        "batch.global_batch_size": 16, "optim.weight_decay": 0.05, "optim.exclude_norm_bias_from_wd": True,
        "schedule.epochs": 1, "schedule.warmup_epochs": 0.1, "finetune.ema_decay": 0.9, "finetune.repeats": 2,
        "finetune.eval_every_epochs": 0, "monitor.knn_every": 0,
    }  # fmt: skip
    cfg = tiny_config(out_dir, name, **{**settings, **overrides})
    cfg.task = "finetune"
    return cfg


# ----------------------------------------------------------------------------- the recipe's parts


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_batch_mixer_is_timms_mixup_seeded_and_leaves_numpy_alone(mixup, cutmix):
    from timm.data import Mixup

    aug = FinetuneAugment(num_classes=5, mixup=mixup, cutmix=cutmix, smoothing=0.1)
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 5
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    got_x, got_t = BatchMixer(aug)(x.clone(), y, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)  # the global generator is put back
    np.random.seed(7)
    ref = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, num_classes=5)
    want_x, want_t = ref(x.clone(), y)
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=0)
    # The arithmetic: every target row is a convex mix of two smoothed one-hot rows, summing to 1.
    assert torch.allclose(got_t.sum(1), torch.ones(8)) and (got_t >= 0.1 / 5 - 1e-7).all()
    again_x, _ = BatchMixer(aug)(x.clone(), y, seed=7)
    other_x, _ = BatchMixer(aug)(x.clone(), y, seed=8)
    assert torch.equal(again_x, got_x) and not torch.equal(other_x, got_x)


def test_mixup_arithmetic_is_a_convex_combination_with_the_reversed_batch():
    """Batch mixup: x' = lam x + (1 - lam) x.flip(0) and the targets alike, lam read off the targets."""
    aug = FinetuneAugment(num_classes=4, mixup=0.8, cutmix=0.0, smoothing=0.0)
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, targets = BatchMixer(aug)(x.clone(), y, seed=3)
    lam = float(targets[0, 0])  # row 0 is class 0 mixed with row 5 (class 1)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    onehot = torch.nn.functional.one_hot(y, 4).float()
    torch.testing.assert_close(targets, lam * onehot + (1 - lam) * onehot.flip(0))


def test_smoothing_alone_is_timms_label_smoothing_loss():
    from timm.loss import LabelSmoothingCrossEntropy

    aug = FinetuneAugment(num_classes=10, mixup=0.0, cutmix=0.0, smoothing=0.1)
    logits = torch.randn(8, 10)
    y = torch.randint(10, (8,))
    _, targets = BatchMixer(aug)(torch.zeros(8, 3, 4, 4), y, seed=0)
    model = Classifier(build_vit("vit_small", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4), 10)
    ours = model.criterion(logits, targets)
    torch.testing.assert_close(ours, LabelSmoothingCrossEntropy(0.1)(logits, y))


def test_ema_is_timms_model_ema_over_optimizer_steps():
    """The backend's momentum update with the classifier's pairs is timm's ModelEmaV3 (decay d:
    ema = d ema + (1 - d) model after every optimizer step), on the parameters."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = Classifier(build_vit("vit_small", img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                 random_patch_proj=False), num_classes=3)  # fmt: skip
    reference = ModelEmaV3(model.base_encoder, decay=0.9)
    backend = SingleProcess(precision="fp32", device=torch.device("cpu"))
    backend.setup(model, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2))
    for _ in range(4):
        x, t = torch.randn(4, 3, 16, 16), torch.softmax(torch.randn(4, 3), 1)
        backend.forward_backward(x, t)
        backend.step(1e-2, 0.0)
        backend.momentum_update(0.9)
        reference.update(model.base_encoder)
    ema = dict(model.momentum_encoder.named_parameters())
    for name, p in reference.module.named_parameters():
        torch.testing.assert_close(ema[name], p, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(ema["head.weight"], model.base_encoder.head.weight)  # it lags the model


def test_drop_path_matches_timm_and_is_off_in_eval():
    vit = build_vit("vit_small", img_size=16, patch_size=8, embed_dim=32, depth=4, num_heads=4, drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in vit.blocks]
    assert rates == pytest.approx([x.item() for x in torch.linspace(0, 0.3, 4)])  # timm's linspace
    plain = build_vit("vit_small", img_size=16, patch_size=8, embed_dim=32, depth=4, num_heads=4)
    assert set(vit.state_dict()) == set(plain.state_dict())  # no parameters: checkpoints unchanged
    plain.load_state_dict(vit.state_dict())
    x = torch.randn(4, 3, 16, 16)
    vit.eval(), plain.eval()
    torch.testing.assert_close(vit(x), plain(x))
    vit.train(), plain.train()
    assert not torch.allclose(vit(x), plain(x))


def test_layer_decay_groups_follow_beit():
    model = Classifier(build_vit("vit_small", img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                 random_patch_proj=False), num_classes=3, ema=False)  # fmt: skip
    scale = layer_decay_scale(2, 0.5)
    assert scale("base_encoder.patch_embed.proj.weight") == 0.125
    assert scale("base_encoder.cls_token") == 0.125
    assert scale("base_encoder.blocks.0.attn.qkv.weight") == 0.25
    assert scale("base_encoder.blocks.1.mlp.fc2.bias") == 0.5
    assert scale("base_encoder.head.weight") == scale("base_encoder.norm.weight") == 1.0
    groups = param_groups(model, exclude_norm_bias=True, lr_scale=scale)
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr_wd(opt, 2.0, 0.05)
    for g in opt.param_groups:
        assert g["lr"] == 2.0 * g["lr_scale"] and g["weight_decay"] == 0.05 * g["wd_scale"]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_without_layer_decay_the_groups_are_unchanged():
    model = build_vit("vit_small", img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    groups = param_groups(model, exclude_norm_bias=True)
    assert [g["wd_scale"] for g in groups] == [1.0, 0.0] and all("lr_scale" not in g for g in groups)


# ----------------------------------------------------------------------------- the data


def test_repeated_augmentation_hands_each_sample_out_in_augmented_copies():
    aug = FinetuneAugment(img_size=32, num_classes=10, mixup=0.0, cutmix=0.0, smoothing=0.0, repeats=3, reprob=0.0)
    loader = FinetuneLoader("demo", aug, batch_size=12, num_workers=0, shuffle_buffer=0)
    images, targets, labels = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape == (12, 3, 32, 32)
    assert labels.view(4, 3).eq(labels.view(4, 3)[:, :1]).all()  # copies in a row: one label each
    assert not torch.equal(images[0], images[1])  # each copy augmented anew
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, 10).float())
    assert len(loader) == 1437 // 12  # an epoch keeps its length


def test_finetune_loader_resumes_mid_epoch_exactly():
    aug = FinetuneAugment(img_size=32, num_classes=10, repeats=3, auto_augment="rand-m9-mstd0.5-inc1")
    kwargs = dict(batch_size=8, num_workers=0, shuffle_buffer=20, seed=3)
    first = FinetuneLoader("demo", aug, **kwargs)
    batches = [b for _, b in zip(range(5), iter(first), strict=False)]
    resumed = FinetuneLoader("demo", aug, **kwargs)
    resumed.load_state_dict({"epoch": 0, "batches_done": 3})
    again = [b for _, b in zip(range(2), iter(resumed), strict=False)]
    for want, got in zip(batches[3:], again, strict=True):
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the trainer


def test_finetuning_resumes_exactly_and_evaluates_model_and_ema(tmp_path):
    """4 steps in one go equal 2 steps, a stop, and 2 more from the checkpoint (RandAugment, random
    erasing, mixup / cutmix, repeated augmentation and drop path all on); then top-1 / top-5 of the
    model and its EMA on the validation set, in metrics.jsonl and results.json."""
    from scale.eval.finetune import FinetuneTrainer

    straight = FinetuneTrainer(tiny_finetune_config(tmp_path, "straight", **{"schedule.max_steps": 4}))
    out = straight.fit()
    FinetuneTrainer(tiny_finetune_config(tmp_path, "split", **{"schedule.max_steps": 2})).fit()
    split = FinetuneTrainer(tiny_finetune_config(tmp_path, "split", **{"schedule.max_steps": 4}))
    split.fit()
    a = [r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "split") if "loss" in r]
    assert len(a) == 4 and a == b
    for (name, x), y in zip(straight.backend.full_state_dict().items(), split.backend.full_state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(x, y), name
    assert 0 <= out["top1"] <= out["top5"] <= 100 and 0 <= out["ema_top1"] <= out["ema_top5"] <= 100
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert f"| model | {out['top1']:.2f} |" in (tmp_path / "straight" / "results.md").read_text()
    assert results["top1"] == out["top1"] and results["num_classes"] == 10 and results["pretrained"] == "random init"
    rows = read_metrics(tmp_path / "straight")
    assert rows[-1]["top1"] == out["top1"] and rows[-1]["step"] == 4


def test_finetuning_from_a_pretraining_run_loads_its_backbone(tmp_path):
    """A pretraining run's base encoder becomes the classifier's backbone (architecture from the
    run's config), every parameter trainable; the EMA starts equal to it."""
    from scale.eval.finetune import build_classifier
    from scale.train.trainer import Trainer

    run = Trainer(tiny_config(tmp_path, "pre", **{"schedule.max_steps": 1, "data.source": "demo",
                                                  "data.num_workers": 0}))  # fmt: skip
    run.fit()
    cfg = tiny_finetune_config(tmp_path, **{"finetune.pretrained": str(tmp_path / "pre"), "model.embed_dim": 64})
    model = build_classifier(cfg, 10)
    assert cfg.model.embed_dim == 32  # the run's architecture, not the recipe's
    pretrained = run.backend.module.base_encoder.state_dict()
    for name, value in model.base_encoder.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, pretrained[name]), name
    assert all(p.requires_grad for p in model.base_encoder.parameters())
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    assert model.base_encoder.head.out_features == 10


def test_finetune_cli_errors_are_one_line(tmp_path, capsys):
    from scale.finetune import main

    for argv, words in [
        (["--recipe", "cpu_demo"], "not a fine-tuning recipe"),
        (["--pretrained", str(tmp_path / "nope")], "does not exist"),
        (["--finetune.layer_decay=0"], "finetune.layer_decay"),
        (["--batch.global_batch_size=15", "--finetune.mixup=0.8"], "even batch"),
        (["--data.backend=dali"], "torchvision"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([*argv, f"--run.output_dir={tmp_path}", "--check"])
        assert words in str(e.value) and "\n" not in str(e.value), (argv, e.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_pretrain_refuses_a_finetuning_recipe():
    from scale.pretrain import main

    with pytest.raises(SystemExit, match="fine-tuning recipe"):
        main(["--recipe", "vit_b_finetune", "--check"])


def test_finetune_recipes_carry_the_published_settings():
    from scale.recipes import TABLE5, get_recipe

    b = get_recipe("vit_b_finetune")
    assert b.task == "finetune" and b.schedule.epochs == 150 and b.batch.global_batch_size == 512
    assert b.optim.base_lr * b.batch.global_batch_size / 256 == pytest.approx(5e-4)  # DeiT: 5e-4 x 512 / 512
    assert (b.finetune.drop_path, b.finetune.ema_decay, b.finetune.smoothing) == (0.1, 0.99996, 0.1)
    assert get_recipe("vit_l_finetune").finetune.drop_path == 0.5
    c = get_recipe("flowers_vit_l_transfer")
    assert (c.finetune.mixup, c.finetune.cutmix, c.finetune.reprob, c.optim.weight_decay) == (0.0, 0.0, 0.25, 0.3)
    assert c.finetune.num_classes == 102 and c.finetune.repeats == 1 and c.schedule.epochs == 100
    assert set(TABLE5) == {"cifar10", "cifar100", "flowers", "pets"}


# ----------------------------------------------------------------------------- exports


def _export_roundtrip(tmp_path, name, **overrides):
    import timm

    from scale.models.export import export_backbone, load_export, read_export_meta

    torch.manual_seed(0)
    backbone = build_backbone(name, **overrides)
    folder = export_backbone(backbone, tmp_path / name, meta={"model": name})
    size = overrides["img_size"]
    x = torch.randn(2, 3, size, size)
    backbone.eval()
    want = backbone.pooled_features(x)
    rebuilt = load_export(folder).eval()
    torch.testing.assert_close(rebuilt.pooled_features(x), want, rtol=0, atol=0)
    config = json.loads((folder / "config.json").read_text())
    assert read_export_meta(folder)["model"] == name
    if "architecture" in config:  # timm builds it from the folder alone
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        if hasattr(model, "blocks"):
            assert model.blocks[0].attn.num_heads == backbone.cfg.num_heads
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    return config


def test_vit_s_export_builds_12_heads_in_timm_not_deits_6(tmp_path):
    config = _export_roundtrip(tmp_path, "vit_small", img_size=32)
    assert config["architecture"] == "vit_small_patch16_224" and config["model_args"]["num_heads"] == 12


def test_vit_b_export_rebuilds_in_timm(tmp_path):
    _export_roundtrip(tmp_path, "vit_base", img_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("vit_large", 32), ("vit_huge", 28)])
def test_large_vit_exports_rebuild_in_timm(tmp_path, name, size):
    _export_roundtrip(tmp_path, name, img_size=size)


@pytest.mark.slow
def test_vit_bn_l7_export_rebuilds_in_scale(tmp_path):
    config = _export_roundtrip(tmp_path, "vit_bn_large_p7", img_size=14)
    assert "architecture" not in config and config["scale"]["config"]["use_bn"] is True


def test_resnet_export_is_timms_resnet(tmp_path):
    config = _export_roundtrip(tmp_path, "resnet18", img_size=32)
    assert config["architecture"] == "resnet18"


def test_exports_never_overwrite(tmp_path):
    from scale.errors import CheckpointError
    from scale.models.export import export_backbone

    backbone = build_vit("vit_small", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4)
    export_backbone(backbone, tmp_path / "out")
    with pytest.raises(CheckpointError, match="already exists"):
        export_backbone(backbone, tmp_path / "out")


def test_a_finetuned_classifier_exports_with_its_head(tmp_path):
    import timm

    from scale.models.export import export_backbone, load_export

    model = Classifier(build_vit("vit_small", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4), 7)
    folder = export_backbone(model.base_encoder, tmp_path / "cls")
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    want = model.base_encoder(x)
    torch.testing.assert_close(timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x), want)
    torch.testing.assert_close(load_export(folder).eval()(x), want)


def _fixed_fit(tmp_path, name, **overrides):
    """A few fine-tuning steps in fp64 on fixed batches of 16 with soft targets; with gradient
    accumulation the same batches in halves of 8."""
    from scale.eval.finetune import FinetuneTrainer
    from tests.distributed.test_finetune_backends import SoftTargetLoader

    class Halves(SoftTargetLoader):
        def _batch(self, epoch, i):
            whole = super()._batch(epoch, i // 2)
            return tuple(t[(i % 2) * 8 : (i % 2 + 1) * 8] for t in whole)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cfg = tiny_finetune_config(tmp_path, name, **{"schedule.max_steps": 3, "finetune.num_classes": 5,
                                                      "data.eval_source": "", **overrides})  # fmt: skip
        accumulate = cfg.batch.grad_accum_steps == 2
        loader = Halves(8, 16) if accumulate else SoftTargetLoader(4, 16)
        trainer = FinetuneTrainer(cfg, loader=loader)
        trainer.fit()
        return [r["loss"] for r in read_metrics(tmp_path / name)], trainer.backend.full_state_dict()
    finally:
        torch.set_default_dtype(previous)


VARIANTS = {"recompute": {"parallel.activation_checkpointing": "true"},
            "selective": {"parallel.activation_checkpointing": "selective"},
            "accumulation": {"batch.grad_accum_steps": 2}}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_recompute_and_accumulation_give_the_plain_step(tmp_path, variant):
    """Recomputed blocks draw the same drop-path masks as the forward (torch's preserved RNG state),
    and two accumulated micro-batches of 8 give one batch of 16's step (no BatchNorm in the ViT)."""
    overrides = {"finetune.drop_path": 0.3}
    if variant == "accumulation":
        overrides = {"finetune.drop_path": 0.0}  # masks drawn per micro-batch: another draw, not another step
    plain_loss, plain = _fixed_fit(tmp_path, "plain", **overrides)
    loss, state = _fixed_fit(tmp_path, variant, **overrides, **VARIANTS[variant])
    assert loss == pytest.approx(plain_loss, rel=1e-10)
    for name, value in plain.items():
        torch.testing.assert_close(state[name], value, rtol=1e-9, atol=1e-11, msg=name)
