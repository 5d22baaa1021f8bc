"""Reading checkpoints never runs code from them (issue 27, item 1): every file scale writes and
reads back (client.pt, model.pt, rng-rank*.pt, FSDP2's scaler.pt) goes through `load_safely`, a
weights-only unpickler with NumPy's arrays allowed; a planted object is refused, not executed."""

import os

import pytest
import torch

from scale.errors import CheckpointError
from scale.safe_load import load_safely


class Planted:
    """What a shared run directory could hold: unpickling it would run `os.system`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_object_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"step": 3, "config": Planted(marker)}, tmp_path / "client.pt")
    with pytest.raises(CheckpointError, match=r"other than tensors and plain data \(posix.system\)") as e:
        load_safely(tmp_path / "client.pt")
    assert "\n" not in str(e.value) and not marker.exists()


def test_the_files_scale_writes_load_safely(tmp_path):
    from scale.train.checkpoint import rng_state

    state = rng_state()  # torch's ByteTensor, NumPy's generator state (an array), Python's tuple
    torch.save(state, tmp_path / "rng.pt")
    back = load_safely(tmp_path / "rng.pt")
    assert torch.equal(back["torch"], state["torch"]) and (back["numpy"][1] == state["numpy"][1]).all()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1, betas=(0.9, 0.99))
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    torch.save({"optimizer": opt.state_dict(), "scaler": None}, tmp_path / "model.pt")
    assert load_safely(tmp_path / "model.pt")["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_a_text_file_as_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "client.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch file") as e:
        load_safely(tmp_path / "client.pt")
    assert "\n" not in str(e.value)


def test_evaluating_a_shared_run_with_a_planted_client_runs_nothing(tmp_path):
    """A run directory whose client.pt was replaced: the evaluation loaders refuse it."""
    from scale.eval.backbone import load_frozen_backbone
    from scale.train.trainer import Trainer
    from tests.helpers import FixedBatchLoader, tiny_config

    Trainer(tiny_config(tmp_path, "run", **{"schedule.max_steps": 1}), loader=FixedBatchLoader(4, 8)).fit()
    client = next((tmp_path / "run" / "checkpoints").glob("step-*/client.pt"))
    marker = tmp_path / "ran"
    torch.save({"step": 1, "config": Planted(marker)}, client)
    with pytest.raises(CheckpointError):
        load_frozen_backbone(tmp_path / "run")
    assert not marker.exists()
