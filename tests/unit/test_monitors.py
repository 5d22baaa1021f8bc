"""The paper's instruments: the dense kNN bank and classifier, gradient norms, spike/dip events,
their place in training (bitwise-neutral, no extra host reads) and scale-plot."""

import json

import pytest
import torch

from scale.train.dense_knn import FeatureBank, bank_steps
from scale.train.events import DipDetector, SpikeDetector
from scale.train.knn import knn_accuracy, knn_counts
from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, tiny_config


def test_bank_is_a_fifo_of_whole_steps_that_wraps_around():
    bank = FeatureBank(steps=3, per_step=2, dim=4, device=torch.device("cpu"))
    assert len(bank) == 0 and not bank.full
    pushed = []
    for i in range(5):
        f = torch.randn(2, 4)
        bank.push(f, torch.tensor([i, i]))
        pushed.append(torch.nn.functional.normalize(f, dim=1))
        assert bank.full == (i >= 2)
    feats, labels = bank.ordered()
    assert labels.tolist() == [2, 2, 3, 3, 4, 4]  # the oldest two steps dropped, in order
    assert torch.equal(feats, torch.cat(pushed[2:]))
    with pytest.raises(ValueError, match="adds 2 features"):
        bank.push(torch.randn(3, 4), torch.zeros(3))


def test_bank_length_rounds_to_whole_steps():
    assert bank_steps(128_116, 2 * 4096) == 16  # ImageNet, 10%, batch 4096: 131,072 features
    assert bank_steps(10, 256) == 1


def test_dense_knn_equals_brute_force_weighted_knn_on_the_same_bank():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    bank_labels = torch.randint(5, (300,), generator=g)
    bank_labels[::7] = -1  # unfilled rows: never neighbours
    queries = torch.randn(64, 16, generator=g)
    labels = torch.randint(5, (64,), generator=g)
    for k in (1, 20, 200):
        q = torch.nn.functional.normalize(queries, dim=1)
        counts = knn_counts(q, labels, bank, bank_labels, ks=(k,), temperature=0.07, rows=24)
        keep = bank_labels >= 0
        expected = knn_accuracy(bank[keep], bank_labels[keep], torch.nn.functional.normalize(queries, dim=1),
                                labels, k=k, temperature=0.07)  # fmt: skip
        assert counts[1] == 64
        assert 100 * counts[0].item() / 64 == pytest.approx(expected)
    labels[:10] = -1  # unlabelled queries are not counted
    assert knn_counts(queries, labels, bank, bank_labels, ks=(20,), temperature=0.07)[1] == 54


def test_spike_detector_finds_spikes_and_their_delay_to_the_last_layer():
    names = ["patch_embed", "block.0", "block.1", "block.2", "projector"]
    det = SpikeDetector(names, threshold=3.0, average_steps=20, warmup=20, window=50, last_layers=2)
    events = []
    for step in range(1, 101):
        norms = [1.0 + 0.05 * ((step * (i + 3)) % 5) for i in range(len(names))]  # noise well under 3x
        if step == 40:
            norms[0] = 10.0
        if step == 46:
            norms[3] = 8.0  # the last block, 6 steps later
        if step == 5:
            norms[1] = 50.0  # inside the warm-up: not reported
        events += det.update(step, norms)[1]
    spikes = [(e["step"], e["layer"]) for e in events if e["event"] == "spike"]
    assert spikes == [(40, "patch_embed"), (46, "block.2")]
    delays = [e for e in events if e["event"] == "spike_delay"]
    assert [(d["from_step"], d["step"], d["delay"]) for d in delays] == [(40, 46, 6)]
    restored = SpikeDetector(names)
    restored.load_state_dict(det.state_dict())
    assert restored.update(101, [1.0] * 5) == det.update(101, [1.0] * 5)


def test_dip_detector_needs_a_drop_beyond_noise_and_reports_it_once():
    det = DipDetector(points=3.0, average_points=10, warmup=3)
    series = [50, 51, 50, 52, 51, 50, 40, 38, 39, 50, 51, 50, 48]
    events = [e for i, v in enumerate(series) for e in det.update(i, v, n=4096)]
    assert [e["step"] for e in events] == [6]
    noisy = DipDetector(points=3.0)  # the same drop measured on 32 queries is within noise
    assert not [e for i, v in enumerate(series) for e in noisy.update(i, v, n=32)]


def _run(tmp_path, name, steps=6, **overrides):
    cfg = tiny_config(tmp_path, name, **{"schedule.max_steps": steps, "run.log_every": 2, **overrides})
    loader = FixedBatchLoader(4, cfg.batch.global_batch_size, classes=3)
    trainer = Trainer(cfg, loader=loader)
    trainer.fit()
    return trainer


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_monitors_change_nothing_in_training_and_write_their_series(tmp_path):
    on = _run(tmp_path, "on", **{"monitor.knn_every": 1, "monitor.knn_bank_size": 1, "monitor.knn_k": 4,
                                 "model.random_patch_proj": False})  # fmt: skip
    off = _run(tmp_path, "off", **{"monitor.knn_every": 0, "monitor.grad_every": 0, "model.random_patch_proj": False})
    assert _losses(on.run_dir) == _losses(off.run_dir)  # bitwise: same floats
    for k, v in off.backend.module.state_dict().items():
        assert torch.equal(v, on.backend.module.state_dict()[k]), k
    rows = [json.loads(r) for r in (on.run_dir / "metrics.jsonl").read_text().splitlines()]
    dense = [r for r in rows if "knn_dense_queries" in r]
    assert [r["step"] for r in dense] == [2, 3, 4, 5, 6]  # the bank (one step) is full after step 1
    assert all(0 <= r["knn_dense_top1"] <= 100 and r["knn_dense_queries"] == 8 for r in dense)
    grads = [json.loads(r) for r in (on.run_dir / "gradients.jsonl").read_text().splitlines()]
    assert grads[0]["layers"] == ["patch_embed", "block.0", "block.1", "projector", "predictor"]
    assert [r["step"] for r in grads[1:]] == [1, 2, 3, 4, 5, 6]
    assert not (off.run_dir / "gradients.jsonl").exists()


def test_group_norms_are_the_norms_of_each_layers_gradients(tmp_path):
    cfg = tiny_config(tmp_path, "g", **{"model.random_patch_proj": False})
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, cfg.batch.global_batch_size))
    b = trainer.backend
    x1, x2, _ = next(iter(trainer.loader))
    b.forward_backward(x1, x2)
    expected = [torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ps])) for ps in b.grad_groups]
    assert torch.allclose(b.group_grad_norms(), torch.stack(expected), rtol=1e-6)


def test_unlabelled_data_turns_the_dense_knn_off_with_one_message(tmp_path, caplog):
    cfg = tiny_config(tmp_path, "u", **{"schedule.max_steps": 3, "monitor.knn_every": 1, "monitor.knn_bank_size": 1})
    trainer = Trainer(cfg, loader=FixedBatchLoader(4, cfg.batch.global_batch_size))  # labels -1
    with caplog.at_level("WARNING"):
        trainer.fit()
    assert sum("no labels" in r.getMessage() for r in caplog.records) == 1
    assert "knn_dense_queries" not in (trainer.run_dir / "metrics.jsonl").read_text()
    assert trainer.backend.module.base_encoder.feature_sink is None


def test_scale_plot_writes_readable_pngs_for_a_short_run(tmp_path):
    from scale.plot import main

    run = _run(tmp_path, "p", steps=4, **{"monitor.knn_every": 1, "monitor.knn_bank_size": 1, "monitor.knn_k": 4})
    other = _run(tmp_path, "q", steps=4, **{"monitor.knn_every": 1, "monitor.knn_bank_size": 1, "monitor.knn_k": 4})
    paths = main([str(run.run_dir), str(other.run_dir), "--out", str(tmp_path / "plots")])
    names = sorted(p.name for p in paths)
    assert names == ["gradients-p.png", "gradients-q.png", "knn.png", "training.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_scale_plot_refuses_a_folder_that_is_no_run_directory(tmp_path):
    from scale.plot import PlotError, main

    with pytest.raises(PlotError, match="no metrics.jsonl"):
        main([str(tmp_path)])
