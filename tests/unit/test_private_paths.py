"""No fixed /tmp names that another user of a shared node could plant (issue 27, item 7): the GPU
check's site, extensions and results folders and the monitor-cost benchmark's run folders are new
private folders or this user's own verified cache folders; a planted folder is never used."""

import os
import stat
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check


def _private(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


@pytest.fixture
def shared_tmp(tmp_path, monkeypatch):
    """A stand-in for a shared /tmp (sticky, world-writable) where tempfile makes its folders."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


def test_the_cache_folder_is_this_users_and_kept(tmp_path, monkeypatch, shared_tmp):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = gpu_check.private_dir("torch-extensions")
    assert first == tmp_path / "cache" / "scale" / "torch-extensions" and _private(first)
    assert _private(first.parent)
    assert gpu_check.private_dir("torch-extensions") == first  # the same folder next run: builds are kept


@pytest.mark.parametrize("plant", ["world-writable", "symlink", "foreign-owner", "group-writable-parent"])
def test_a_planted_folder_is_not_used(tmp_path, monkeypatch, shared_tmp, plant, capsys):
    cache = tmp_path / "cache"
    target = cache / "scale" / "torch-extensions"
    target.parent.mkdir(parents=True, mode=0o700)
    if plant == "world-writable":
        target.mkdir(mode=0o700)
        target.chmod(0o777)
    elif plant == "symlink":
        elsewhere = shared_tmp / "theirs"
        elsewhere.mkdir()
        target.symlink_to(elsewhere)
    elif plant == "foreign-owner":
        if os.geteuid() != 0:
            pytest.skip("making a folder owned by another user needs root")
        target.mkdir(mode=0o700)
        os.chown(target, 65534, 65534)
    else:
        target.parent.chmod(0o775)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    got = gpu_check.private_dir("torch-extensions")
    assert got != target and got.parent == shared_tmp and _private(got)
    assert "not using" in capsys.readouterr().out


def test_torch_extensions_default_to_the_private_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gpu_check.extensions_dir.cache_clear()
    try:
        env = gpu_check._env()
    finally:
        gpu_check.extensions_dir.cache_clear()
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "cache" / "scale" / "torch-extensions")
    assert _private(Path(env["TORCH_EXTENSIONS_DIR"]))


def _wheel(folder: Path, module: str) -> Path:
    """A minimal pure-Python wheel of one module."""
    folder.mkdir()
    path = folder / f"{module}-1.0-py3-none-any.whl"
    info = f"{module}-1.0.dist-info"
    files = {
        f"{module}.py": "WHERE = 'from the wheel'\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return folder


def test_wheels_go_to_a_new_private_site_not_a_planted_one(tmp_path, monkeypatch, shared_tmp):
    """Another user made /tmp/scale-gpu-site first and put a module there: the check installs into
    a folder of its own and imports what it installed."""
    module = "scale_gpu_check_probe_pkg"
    planted = shared_tmp / "scale-gpu-site"
    planted.mkdir()
    planted.chmod(0o777)
    (planted / f"{module}.py").write_text("WHERE = 'planted'\n")
    monkeypatch.setattr(gpu_check, "NEEDED", (module,))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    site = Path(tempfile.mkdtemp(prefix="scale-gpu-check-work-")) / "site"
    message = gpu_check.install_wheels(_wheel(tmp_path / "wheels", module), site)
    assert str(site) in message and _private(site.parent)
    monkeypatch.delitem(sys.modules, module, raising=False)
    __import__(module)
    assert sys.modules[module].WHERE == "from the wheel"
    assert str(planted) not in os.environ["PYTHONPATH"] and str(planted) not in sys.path
    monkeypatch.delitem(sys.modules, module)


def test_the_cpu_run_writes_its_results_to_a_new_private_folder(tmp_path, monkeypatch, shared_tmp, capsys):
    planted = shared_tmp / "scale-gpu-check"
    planted.mkdir()
    planted.chmod(0o777)
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    assert gpu_check.main(["--wheels", str(tmp_path / "none"), "--only", "ceilings"]) == 0
    assert list(planted.iterdir()) == []
    summary = Path(capsys.readouterr().out.strip().splitlines()[-1].split("; ", 1)[1].split(", ")[0])
    assert summary.name == "summary.md" and summary.parent.parent == shared_tmp and _private(summary.parent)
    assert sorted(p.name for p in shared_tmp.iterdir()) == sorted(["scale-gpu-check", summary.parent.name])


def test_monitor_cost_runs_in_a_new_private_folder_removed_at_the_end(monkeypatch, shared_tmp):
    from benchmarks import monitor_cost

    planted = shared_tmp / "scale-monitor-cost"
    planted.mkdir()
    planted.chmod(0o777)
    seen = []

    def trainer(model, batch, monitors, bank, out):
        seen.append((Path(out), _private(Path(out))))
        raise RuntimeError("stop here: the folder is what this test checks")

    monkeypatch.setattr(monitor_cost, "_trainer", trainer)
    monkeypatch.setattr(monitor_cost, "setup_logging", lambda: None)
    with pytest.raises(RuntimeError, match="stop here"):
        monitor_cost.main(["--model", "vit_small"])
    (out, private), *_ = seen
    assert out != planted and out.parent == shared_tmp and private
    assert not out.exists() and list(planted.iterdir()) == []
