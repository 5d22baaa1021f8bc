"""A frozen backbone from the run checkpoints of every backend (the sharded ones read whole on one
process), equal to the trained base encoder."""

import pytest
import torch

from scale.errors import CheckpointError
from scale.eval.backbone import load_frozen_backbone
from scale.train.trainer import Trainer
from tests.distributed.test_ddp_trainer import backend_overrides
from tests.helpers import FixedBatchLoader, run_ranks, tiny_config

pytestmark = pytest.mark.distributed


def _train(rank, world, out_dir, backend):
    overrides = {**backend_overrides(backend), "schedule.max_steps": 3}
    if backend != "single":
        overrides["parallel.precision"] = "bf16" if backend.startswith("zero") else "fp32"
    trainer = Trainer(tiny_config(out_dir, backend, **overrides), loader=FixedBatchLoader(4, 8, world, rank))
    trainer.fit()
    full = trainer.backend.full_state_dict()
    if rank == 0:
        torch.save({k[len("base_encoder."):]: v for k, v in full.items() if k.startswith("base_encoder.")},
                   f"{out_dir}/{backend}-expected.pt")  # fmt: skip


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero1", "zero3"])
def test_backbone_of_every_backends_run_checkpoint_equals_the_trained_base_encoder(tmp_path, backend):
    run_ranks(_train, 2, str(tmp_path), backend)
    expected = torch.load(tmp_path / f"{backend}-expected.pt", weights_only=True)
    loaded = load_frozen_backbone(tmp_path / backend)  # the run directory: its newest checkpoint
    assert loaded.step == 3 and loaded.kind.startswith("run")
    got = loaded.model.state_dict()
    for name, value in expected.items():
        if name.startswith("head."):
            continue
        # ZeRO in bf16: the fp32 masters are consolidated; the module copy is their bf16 rounding
        tol = dict(rtol=1e-2, atol=1e-2) if backend.startswith("zero") else dict(rtol=0, atol=0)
        torch.testing.assert_close(got[name], value.float(), **tol, msg=name)
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training


def test_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    from scale.models import build_moco
    from scale.models.formats import official_state

    model = build_moco("vit_small", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, dim=16, mlp_dim=64)
    torch.save(official_state(model, arch="vit_small"), tmp_path / "moco.pth.tar")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_frozen_backbone(tmp_path / "moco.pth.tar", img_size=32, patch_size=8)  # vit_small is 384 wide
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_frozen_backbone(tmp_path / "missing.pth")
    loaded = load_frozen_backbone(tmp_path / "moco.pth.tar", img_size=32, patch_size=8, embed_dim=32, depth=2,
                                  num_heads=4)  # fmt: skip
    assert loaded.kind == "moco"


def test_a_timm_state_dict_loads_with_model_named(tmp_path):
    from scale.models import build_vit
    from scale.models.formats import export_timm_state_dict

    vit = build_vit("vit_small", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    torch.save(export_timm_state_dict(vit), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="pass --model"):
        load_frozen_backbone(tmp_path / "timm.pth")
    loaded = load_frozen_backbone(tmp_path / "timm.pth", model="vit_small", img_size=32, patch_size=8, embed_dim=32,
                                  depth=2, num_heads=4)  # fmt: skip
    assert loaded.kind == "timm" and all(torch.equal(loaded.model.state_dict()[k], v)
                                         for k, v in export_timm_state_dict(vit).items())  # fmt: skip
