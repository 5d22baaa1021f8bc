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


# ---------------------------------------------------------------------------------------------- resume


def _rows(out):
    """metrics.jsonl without the timing column (the one thing a resumed probe may differ in)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "features_per_s"} for r in rows]


def _interrupt_at(monkeypatch, step, how):
    """At the end of training step `step` (1-based, counted over the whole probe): SIGUSR2 to this
    process (`how='signal'`: the preemption path), or an exception as a kill would leave things
    (`how='kill'`: no state written for the step)."""
    import os
    import signal

    real = LinearProbe.train_batch
    count = {"n": 0}

    def train_batch(self, feats, labels):
        out = real(self, feats, labels)
        count["n"] += 1
        if count["n"] == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGUSR2)
            else:
                raise KeyboardInterrupt("killed")
        return out

    monkeypatch.setattr(LinearProbe, "train_batch", train_batch)


@pytest.mark.parametrize(
    "augment, how, step",
    [(False, "signal", 3), (False, "signal", 6), (False, "kill", 9), (True, "signal", 9)],
    ids=["cached-mid-epoch", "cached-epoch-end", "cached-killed", "augmented-mid-epoch"],
)
def test_an_interrupted_probe_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch, augment, how, step):
    """Preempted (SIGUSR2: the state of that very step saved) or killed (the state of the last
    epoch's end is all there is), then the same probe again: the final accuracies and every metrics
    row (losses, evaluations) equal the uninterrupted probe's, none twice. 96 small images of 4
    classes, 6 steps of 16 per epoch; with augmentation the data position inside an epoch and each
    sample's crop must be restored too."""
    from scale.safe_load import load_safely
    from scale.train.preemption import Preempted, PreemptionWatch

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    kw = dict(base_lrs=(0.3, 3.0), epochs=3, eval_every=1, log_every=2, augment=augment, batchnorm=True,
              batch_size=16)  # fmt: skip
    data = str(write_image_folder(tmp_path / "data", random_images(96, 40), labels=[i % 4 for i in range(96)]))
    per_epoch = 6

    def probe(name, **extra):
        return LinearProbe(backbone(), data, data, tmp_path / name, settings(**kw), **extra)

    reference = probe("ref").run()
    watch = PreemptionWatch("USR2", check_every=1)
    try:
        with monkeypatch.context() as m:
            _interrupt_at(m, step, how)
            with pytest.raises(Preempted if how == "signal" else KeyboardInterrupt) as stopped:
                probe("p", preempt=watch).run()
        saved = load_safely(tmp_path / "p" / "probe_state.pt")  # weights only
        if how == "signal":
            assert stopped.value.step == step and not stopped.value.requeued
            epoch, done = (step - 1) // per_epoch, (step - 1) % per_epoch + 1
            assert (saved["step"], saved["epoch"], saved["batches_done"]) == (step, epoch, done)
        else:  # the end of epoch 1: the kill lost the steps after it
            assert (saved["step"], saved["epoch"], saved["batches_done"]) == (per_epoch, 1, 0)
        resumed = probe("p", preempt=watch).run()
    finally:
        watch.close()
    assert resumed["lrs"] == reference["lrs"] and resumed["best"] == reference["best"]
    assert _rows(tmp_path / "p") == _rows(tmp_path / "ref")
    assert json.loads((tmp_path / "p" / "linear_probe.json").read_text())["lrs"] == reference["lrs"]


def test_a_probe_does_not_resume_or_append_to_another_evaluation(tmp_path):
    """An unfinished probe of other settings in the folder is refused (its files byte-identical); a
    finished one is refused without overwrite; with it, its files are set aside, not deleted."""
    from scale.errors import ConfigError

    out = tmp_path / "p"
    LinearProbe(backbone(), "demo", "demo:val", out, settings(epochs=2)).run()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="already holds an evaluation's results"):
        LinearProbe(backbone(), "demo", "demo:val", out, settings(epochs=2)).run()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "linear_probe.json").unlink()  # as if the first had stopped before its end
    (out / "linear_probe.md").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"unfinished evaluation with other settings \(epochs: 2 -> 3\)"):
        LinearProbe(backbone(), "demo", "demo:val", out, settings(epochs=3)).run()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    LinearProbe(backbone(), "demo", "demo:val", out, settings(epochs=3), overwrite=True).run()
    (aside,) = out.glob("replaced-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.is_file()} == before
    assert {r["epoch"] for r in _rows(out)} == {3}  # only the new probe's rows (eval_every 1000: the last)
