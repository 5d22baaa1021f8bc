import json


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
