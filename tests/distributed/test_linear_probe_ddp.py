"""The linear probe under DDP (2 gloo ranks) and through its CLI, from a run checkpoint."""

import json

import pytest
import torch

from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, run_ranks, tiny_config

pytestmark = pytest.mark.distributed


def _probe(rank, world, out_dir, augment):
    from scale.eval.linear_probe import LinearProbe
    from tests.unit.test_linear_probe import backbone, settings

    s = settings(epochs=3, base_lrs=(0.3, 3.0), augment=augment, batchnorm=True)
    result = LinearProbe(backbone(), "demo", "demo:val", f"{out_dir}/p{augment}", s).run()
    torch.save(result["lrs"], f"{out_dir}/rank{rank}-{augment}.pt")


@pytest.mark.parametrize("augment", [False, True])
def test_two_ranks_probe_together_and_report_the_same_numbers(tmp_path, augment):
    run_ranks(_probe, 2, str(tmp_path), augment)
    r0, r1 = (torch.load(tmp_path / f"rank{r}-{augment}.pt") for r in (0, 1))
    assert r0 == r1 and all(20.0 < r["top1"] <= 100.0 for r in r0)  # 10 classes: chance is 10%
    result = json.loads((tmp_path / f"p{augment}" / "linear_probe.json").read_text())
    assert result["world_size"] == 2


def test_cli_probes_a_run_checkpoint_and_errors_are_one_line(tmp_path, capsys):
    from scale.linear_probe import main

    cfg = tiny_config(tmp_path, "run", **{"schedule.max_steps": 2})
    Trainer(cfg, loader=FixedBatchLoader(4, 8)).fit()
    out = tmp_path / "probe"
    result = main([str(tmp_path / "run"), "--train", "demo", "--val", "demo:val", "--epochs", "2", "--batch-size",
                   "128", "--lrs", "1,3", "--no-augment", "--workers", "0", "--no-progress", "--no-tensorboard",
                   "--out", str(out)])  # fmt: skip
    assert result["pretrain_step"] == 2 and result["checkpoint_kind"] == "run (single/ddp)"
    assert (out / "linear_probe.md").is_file() and (out / "metrics.jsonl").is_file()
    assert "linear probe of" in capsys.readouterr().out
    for args, message in [([str(tmp_path / "missing")], "does not exist"),
                          ([str(tmp_path / "run"), "--lrs", "a,b"], "--lrs"),
                          ([str(tmp_path / "run"), "--crop-size", "64"], "built for 32 px")]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([*args, "--train", "demo", "--val", "demo:val", "--out", str(tmp_path / "wrong")])
        assert not (tmp_path / "wrong").exists()
        text = str(e.value.code)  # one line: "config error: ..." for an argument, "error: ..." otherwise
        assert message in text and text.startswith(("error:", "config error:")) and "\n" not in text, text


def _knn_cli(rank, world, run_dir, out):
    from scale.knn_eval import main

    main([run_dir, "--train", "demo", "--val", "demo:val", "--workers", "0", "--ks", "1,20", "--out", out])


def test_knn_eval_cli_on_two_ranks_equals_one_rank(tmp_path):
    from scale.knn_eval import main

    Trainer(tiny_config(tmp_path, "run", **{"schedule.max_steps": 1}), loader=FixedBatchLoader(4, 8)).fit()
    one = main([str(tmp_path / "run"), "--train", "demo", "--val", "demo:val", "--workers", "0", "--ks", "1,20",
                "--out", str(tmp_path / "k1")])  # fmt: skip
    run_ranks(_knn_cli, 2, str(tmp_path / "run"), str(tmp_path / "k2"))
    two = json.loads((tmp_path / "k2" / "knn.json").read_text())
    assert two["world_size"] == 2 and two["top1"] == pytest.approx(one["top1"], abs=1e-9)
