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


@pytest.fixture
def untrusted():
    from scale.safe_load import trust_checkpoint_code

    trust_checkpoint_code(False)
    yield
    trust_checkpoint_code(False)


def _dcp_checkpoint(path, **extra):
    """A DCP checkpoint as FSDP2 writes one (one process, no process group)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"w": torch.ones(4)}, "step": 3, **extra}, checkpoint_id=str(path), no_dist=True)


def test_planted_dcp_metadata_or_entries_are_refused_and_never_run(tmp_path, untrusted):
    """FSDP2's checkpoints (DCP) are pickle-based: the metadata and the non-tensor entries are checked
    with a restricted unpickler before DCP reads them (the evaluation loader and the FSDP2 resume use
    the same reader and planner)."""
    import pickle

    from scale.eval.backbone import _dcp_model_state
    from scale.safe_load import trust_checkpoint_code

    _dcp_checkpoint(tmp_path / "good")
    assert torch.equal(_dcp_model_state(tmp_path / "good")["w"], torch.ones(4))  # genuine files pass

    marker = tmp_path / "ran"
    _dcp_checkpoint(tmp_path / "meta")
    meta = pickle.loads((tmp_path / "meta" / ".metadata").read_bytes())
    meta.planted = Planted(marker)
    (tmp_path / "meta" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=r"asks for posix.system.*--trust-checkpoint-code") as e:
        _dcp_model_state(tmp_path / "meta")
    assert "\n" not in str(e.value) and not marker.exists()

    _dcp_checkpoint(tmp_path / "entry", config=Planted(marker))
    with pytest.raises(CheckpointError, match="posix.system"):
        _dcp_model_state(tmp_path / "entry")
    assert not marker.exists()

    trust_checkpoint_code()  # the user names the risk: the full unpickler, which runs it
    _dcp_model_state(tmp_path / "entry")
    assert marker.exists()


def test_deepspeed_files_are_checked_before_deepspeed_reads_them(tmp_path, untrusted):
    """DeepSpeed's engine files are read by DeepSpeed with the full unpickler: each is checked first.
    Its own data classes (loss scaler, ZeRO stage, fragment addresses) pass; anything else is refused."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from scale.eval.backbone import _deepspeed_model_state
    from scale.safe_load import check_file, check_files

    genuine = {"loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0**16, 1000, 1, False, False),
               "zero_stage": ZeroStageEnum.gradients, "fp32": torch.ones(4),
               "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]}  # fmt: skip
    torch.save(genuine, tmp_path / "optim_states.pt")
    check_file(tmp_path / "optim_states.pt")

    marker = tmp_path / "ran"
    engine = tmp_path / "step-00000001" / "engine"
    engine.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(4)}}, engine / "mp_rank_00_model_states.pt")
    torch.save(
        {"optimizer_state_dict": {"planted": Planted(marker)}}, engine / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    assert "posix.system" in check_files(sorted(engine.glob("*.pt")))
    assert check_files(sorted(engine.glob("*.pt")), rank=0, world_size=2) is None  # rank 1 checks the planted one
    with pytest.raises(CheckpointError, match="posix.system"):
        _deepspeed_model_state(tmp_path / "step-00000001")
    assert not marker.exists()
