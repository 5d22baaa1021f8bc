"""The linear probe on the bundled digits with a tiny frozen ViT: the authors' protocol, several
lrs in one pass equal to single-lr runs, a reference solver, a bitwise-unchanged backbone, errors."""

import json

import pytest
import torch

from scale.errors import DataError
from scale.eval.backbone import LoadedBackbone
from scale.eval.linear_probe import LinearProbe, ProbeHeads, ProbeSettings
from scale.models import build_vit
from tests.helpers import random_images, write_image_folder


def backbone():
    torch.manual_seed(0)
    vit = build_vit("vit_small", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    return LoadedBackbone(vit.eval().requires_grad_(False), "test backbone", "test", "vit_small")


def settings(**kw):
    base = dict(epochs=4, batch_size=128, base_lrs=(3.0,), augment=False, crop_size=32, num_workers=0,
                progress=False, tensorboard=False, eval_every=1000, log_every=1000)  # fmt: skip
    return ProbeSettings(**{**base, **kw})


def probe(tmp_path, name, **kw):
    return LinearProbe(backbone(), "demo", "demo:val", tmp_path / name, settings(**kw)).run()


def test_heads_follow_the_authors_init_and_lr_rule():
    heads = ProbeHeads(32, 10, (0.3, 3.0), batchnorm=True, seed=0)
    w = heads.heads[0].weight.detach()
    assert abs(float(w.std()) - 0.01) < 0.002 and torch.all(heads.heads[0].bias.detach() == 0)
    assert not any(p.requires_grad for p in heads.norm.parameters())  # affine-free
    assert settings(batch_size=1024).lr(3.0) == 12.0  # base lr 3 at batch 1024: the authors' ViT lr
    # A head's initial weights depend on its lr alone (so one pass equals separate runs).
    assert torch.equal(ProbeHeads(32, 10, (3.0,), False, 0).heads[0].weight, heads.heads[1].weight)


@pytest.mark.parametrize("augment", [False, True])
def test_several_lrs_in_one_pass_equal_single_lr_runs(tmp_path, augment):
    kw = dict(augment=augment, epochs=2 if augment else 6)
    multi = probe(tmp_path, "multi", base_lrs=(0.3, 3.0), **kw)
    for i, lr in enumerate((0.3, 3.0)):
        single = probe(tmp_path, f"single{lr}", base_lrs=(lr,), **kw)
        one, many = single["lrs"][0], multi["lrs"][i]
        assert (one["top1"], one["top5"]) == (many["top1"], many["top5"])
    best = max(multi["lrs"], key=lambda r: r["top1"])
    assert multi["best"]["base_lr"] == best["base_lr"]
    written = json.loads((tmp_path / "multi" / "linear_probe.json").read_text())
    assert written["best"] == multi["best"] and "(best)" in (tmp_path / "multi" / "linear_probe.md").read_text()


def test_on_fixed_features_the_probe_matches_a_logistic_regression_solver(tmp_path):
    """The same objective (weight decay 1 / (C n) is sklearn's C): a strictly convex problem, so a
    well-optimised probe reaches the solver's accuracy (within 1 point, 360 validation digits)."""
    from sklearn.linear_model import LogisticRegression

    lb = backbone()
    p = LinearProbe(lb, "demo", "demo:val", tmp_path / "lr", settings(epochs=100, base_lrs=(1.0, 3.0),
                                                                       weight_decay=1 / 1437))  # fmt: skip
    ours = max(r["top1"] for r in p.run()["lrs"])
    (ftr, ytr), (fva, yva) = p._cache(p.train_src), p._cache(p.val_src)
    clf = LogisticRegression(C=1.0, max_iter=10000).fit(ftr.numpy(), ytr.numpy())
    reference = 100 * clf.score(fva.numpy(), yva.numpy())
    assert abs(ours - reference) <= 1.0, (ours, reference)


def test_the_backbone_is_bitwise_unchanged_and_a_change_is_caught(tmp_path):
    lb = backbone()
    before = {k: v.clone() for k, v in lb.model.state_dict().items()}
    p = LinearProbe(lb, "demo", "demo:val", tmp_path / "u", settings(epochs=2, batchnorm=True, augment=True))
    p.run()
    assert all(torch.equal(before[k], v) for k, v in lb.model.state_dict().items())
    with torch.no_grad():
        lb.model.norm.weight.add_(1e-3)
    with pytest.raises(RuntimeError, match="frozen backbone changed"):
        p.check_backbone_unchanged()


def test_bad_data_is_a_clear_error(tmp_path):
    train = write_image_folder(tmp_path / "train", random_images(6, 32), labels=[0, 1, 0, 1, 0, 1])
    val = write_image_folder(tmp_path / "val", random_images(3, 32), labels=[0, 1, 2])
    with pytest.raises(DataError, match="validation classes must be among the training ones"):
        LinearProbe(backbone(), str(train), str(val), tmp_path / "o", settings())
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError):
        LinearProbe(backbone(), str(tmp_path / "empty"), str(val), tmp_path / "o", settings())
    with pytest.raises(ValueError, match="distinct positive base lrs"):
        LinearProbe(backbone(), "demo", "demo:val", tmp_path / "o", settings(base_lrs=(1.0, 1.0)))


def test_low_shot_probe_trains_on_n_labels_per_class(tmp_path):
    p = LinearProbe(backbone(), "demo", "demo:val", tmp_path / "few", settings(labels_per_class=3, batch_size=10))
    feats, labels = p._few_labels(*p._cache(p.train_src))
    assert feats.shape[0] == 30 and torch.bincount(labels, minlength=10).tolist() == [3] * 10
    assert p.run()["settings"]["labels_per_class"] == 3
    with pytest.raises(ValueError, match="--no-augment"):
        LinearProbe(backbone(), "demo", "demo:val", tmp_path / "o", settings(labels_per_class=3, augment=True))
    with pytest.raises(DataError, match="fewer than 1000 samples"):
        LinearProbe(backbone(), "demo", "demo:val", tmp_path / "o", settings(labels_per_class=1000)).run()
