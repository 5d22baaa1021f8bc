import json

import pytest
import torch


def test_flops_cli_writes_the_table(tmp_path):
    from benchmarks.flops import main

    out = tmp_path / "flops.md"
    main(["--out", str(out)])
    text = out.read_text()
    assert "| ViT-H/14 | 630.8 | 257 | 167.29 | 167.29 | 166.7 | +0.36% |" in text


def test_data_benchmark_runs_end_to_end(tmp_path):
    from benchmarks.data import main

    main(["--num-images", "16", "--batch-size", "4", "--crop-size", "32", "--workers", "1", "--max-batches", "1",
          "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "data.json").read_text())
    rows = {(r["backend"], r["source"], r["workers"]): r for r in result["rows"]}
    assert ("torchvision", "shards", 1) in rows and ("dali-cpu", "shards", 1) in rows
    assert all(r["images_per_s"] > 0 for r in rows.values() if "error" not in r)


TINY_ARGS = ["--model", "vit_small", "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "2",
             "--num-heads", "4", "--dim", "16", "--mlp-dim", "64", "--batch-size", "8", "--precision", "fp32",
             "--warmup", "1", "--steps", "2", "--workers", "0"]  # fmt: skip


def test_throughput_cli_reports_flops_that_agree_with_the_model(tmp_path):
    from benchmarks.throughput import main, paper_view
    from scale.models import resolve_vit_config
    from scale.models.flops import moco_training_flops

    result = main([*TINY_ARGS, "--out", str(tmp_path)])
    cfg = resolve_vit_config("vit_small", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    assert result["flops_per_image"] == moco_training_flops(cfg, 16, 64).total
    # (the MFU's denominator on a CPU is a matmul peak measured beside the run: on a loaded machine it
    # can come out low, so only its sign is a property of the code)
    assert result["img_per_s_per_device"] > 0 and result["mfu"] > 0
    assert result["step_s"] == pytest.approx(sum(result["phases_s"].values()))
    assert result["paper_table3"] is None  # not the paper's configuration
    assert [r["gpus"] for r in result["projection"]] == [8, 64, 256, 1024]
    # projected at the assumed 40% MFU of an H100 (this is a CPU: its own MFU would say nothing of a GPU)
    assert result["projection"][0]["mfu"] == 0.40
    assert result["projection"][0]["compute_s"] == pytest.approx(512 * result["flops_per_image"] / (989e12 * 0.4))
    saved = json.loads((tmp_path / "throughput-vit_small-single-1x.json").read_text())
    assert saved["tflops_per_device"] == pytest.approx(saved["img_per_s_per_device"] * saved["flops_per_image"] / 1e12)
    assert (tmp_path / "throughput-vit_small-single-1x.md").read_text().startswith("# Throughput")
    b = paper_view("vit_base")  # Table 3: 2.1 h per 100 epochs on 256 TPU-v3 cores
    assert b["img_per_s_per_core"] == pytest.approx(1_281_167 * 100 / (2.1 * 3600 * 256))


def test_side_by_side_variants_start_from_the_same_weights_and_batch(tmp_path, capsys):
    from benchmarks.throughput import main

    result = main([*TINY_ARGS, "--compare", "reference,per_view,joint", "--rounds", "2", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == ["reference", "per_view", "joint"]
    # Algorithm 1 written plainly, scale's per-view and joint steps: the same first loss.
    assert rows["per_view"]["first_loss"] == pytest.approx(rows["reference"]["first_loss"], rel=1e-6)
    assert rows["joint"]["first_loss"] == pytest.approx(rows["reference"]["first_loss"], rel=1e-6)
    assert rows["reference"]["ratio_to_first"] == 1.0 and len(rows["joint"]["step_s_rounds"]) == 2
    assert rows["joint"]["step_s"] == sorted(rows["joint"]["step_s_rounds"])[1]  # the median of 2: upper
    text = (tmp_path / "compare-vit_small-single-1x.md").read_text()
    assert text.startswith("# Side by side") and "| joint |" in text and "before / after" in text
    with pytest.raises(SystemExit):  # argparse's one line, before anything is built
        main([*TINY_ARGS, "--compare", "per_view,fast", "--out", "-"])
    assert "argument --compare: 'fast' unknown" in capsys.readouterr().err


def test_scaling_projection_ranks_every_backend_and_stands_beside_table_3(tmp_path):
    from benchmarks.scaling import hours, main

    rows = main(["--models", "vit_small", "--gpus", "8,256", "--out", str(tmp_path)])
    assert [r["gpus"] for r in rows] == [8, 256] and rows[1]["images_per_gpu"] == 16
    r = rows[1]
    fastest = min((x for x in r["backends"].values() if x), key=lambda x: x["step_s"])
    assert r["chosen_hours_100ep"] == pytest.approx(fastest["hours_100ep"])  # no accumulation needed at 16/GPU
    assert fastest["hours_100ep"] == pytest.approx(hours(fastest["step_s"], 4096))
    assert hours(1.0, 4096) == pytest.approx(100 * 1_281_167 / 4096 / 3600)
    text = (tmp_path / "scaling.md").read_text()
    assert "256: 1.2" in text and "40% MFU assumed" in text  # beside Table 3, with its assumptions


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("NVIDIA L40S", "fp16", 362.1),
    ],
)
def test_mfu_peak_is_the_one_of_the_precision_used(monkeypatch, name, precision, peak):
    from scale.hardware.peaks import device_peak

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    value, label = device_peak(torch.device("cuda", 0), precision)
    assert value == pytest.approx(peak * 1e12) and precision in label


def test_fp32_with_tf32_is_measured_against_the_tf32_peak(monkeypatch):
    from scale.parallel.base import SingleProcess

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    backend = SingleProcess("fp32", device=torch.device("cuda", 0))
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert backend.compute_precision == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert backend.compute_precision == "fp32"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert SingleProcess("fp32").compute_precision == "fp32"  # CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real check: make gpu-check")
def test_gpu_check_runs_end_to_end_without_a_gpu_and_says_what_it_skipped(tmp_path):
    """`make gpu-check` on a CPU: every CUDA-only step is reported as skipped with its reason, in
    seconds, and the results are three files (a lent GPU machine returns at most 8)."""
    import tarfile

    from benchmarks.gpu_check import PROBES, main

    assert main(["--out", str(tmp_path), "--wheels", str(tmp_path / "none")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.tar.gz", "summary.json", "summary.md"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {r["name"].strip(): r for r in summary["steps"]}
    assert steps["environment"]["status"] == "passed"
    assert all(steps[name]["status"] == "skipped" and "CUDA" in steps[name]["detail"] for name in PROBES)
    assert steps["pytest -m gpu tests/gpu"]["status"] == "passed"
    gpu_tests = [r for name, r in steps.items() if "::" in name]
    assert len(gpu_tests) >= 15 and all(r["status"] == "skipped" and "CUDA" in r["detail"] for r in gpu_tests)
    assert "GPU check" in (tmp_path / "summary.md").read_text()
    with tarfile.open(tmp_path / "gpu-check.tar.gz") as tar:
        assert "gpu-check/pytest-gpu.log" in tar.getnames()


def test_gpu_check_fails_when_a_needed_package_is_missing_and_no_wheel_is_there(tmp_path, monkeypatch):
    """A bare GPU image without its wheels would run every DeepSpeed test as skipped and pass: a failure."""
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "NEEDED", ("no_such_package_scale",))
    assert gpu_check.main(["--out", str(tmp_path), "--wheels", str(tmp_path / "none"), "--only", "ceilings"]) == 1
    steps = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())["steps"]}
    assert steps["environment"]["status"] == "failed" and "make gpu-wheels" in steps["environment"]["detail"]


def test_timed_steps_hand_every_step_to_the_monitors(tmp_path):
    """The benchmarks' phase loop takes the monitors along as the trainer does: the features the
    dense kNN monitor taps from every forward are pushed to its bank, not piled up (they inflated
    `benchmarks.memory`'s figures)."""
    from benchmarks.throughput import _phases
    from scale.train.trainer import Trainer
    from tests.helpers import FixedBatchLoader, tiny_config

    trainer = Trainer(tiny_config(tmp_path, "phases", **{"monitor.knn_every": 1, "monitor.knn_bank_size": 1}),
                      loader=FixedBatchLoader(4, 8, classes=3))  # fmt: skip
    knn = trainer.monitors.knn
    phases, _ = _phases(trainer.backend, iter(trainer.loader), 1e-3, 0.0, 3, lambda: None, trainer.monitors)
    assert knn.tapped == [] and knn.bank.pushed == 3 and phases["monitors"] > 0
