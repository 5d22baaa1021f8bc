"""A frozen backbone from whatever checkpoint a user has.

- a run of this project: its run directory (the newest complete checkpoint), or one
  `checkpoints/step-*` directory, of any backend: `model.pt` (single process, DDP), `dcp/` (FSDP2,
  torch.distributed.checkpoint: read whole on one process, any world size), `engine/` (DeepSpeed
  ZeRO-1/2/3: the fp32 partitions consolidated with DeepSpeed's own zero_to_fp32). The architecture
  comes from the checkpoint's resolved config, so no `--model` is needed;
- the authors' releases (`{'arch', 'state_dict': {'module.base_encoder.*', ...}}`, ViT and ResNet-50),
  timm ViT and torchvision ResNet state dicts: `--model` names the architecture when the file does
  not.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scale.config import config_from_dict
from scale.errors import CheckpointError
from scale.models import RESNET_PRESETS, ResNet, build_backbone, is_resnet
from scale.models.export import is_export, load_export, read_export_meta
from scale.models.formats import backbone_state_dict, load_backbone, read_checkpoint
from scale.models.vit import VIT_ALIASES, VIT_PRESETS, VisionTransformer
from scale.safe_load import (
    check_file,
    check_files,
    dcp_load_safely,
    load_safely,
    trust_checkpoint_code,
)
from scale.train.parallelize import build_model

log = logging.getLogger(__name__)


@dataclass
class LoadedBackbone:
    model: VisionTransformer | ResNet
    """The backbone, eval mode, frozen (its head is not used: `pooled_features` stops before it)."""
    source: str
    """What was read, for results files."""
    kind: str
    """'run (single/ddp)', 'run (fsdp)', 'run (deepspeed)', 'moco', 'timm', 'torchvision'."""
    name: str = ""
    """The architecture's preset name (vit_base, ...)."""
    step: int | None = None
    """The pretraining step of a run checkpoint."""
    config: dict[str, Any] | None = None
    """The run's resolved config (run checkpoints only)."""


def resolve_run_checkpoint(path: Path) -> Path | None:
    """The checkpoint directory `path` names: itself (a `step-*` with client.pt), the newest complete
    one of a run directory, or None when `path` is not a run's."""
    if path.is_dir() and (path / "client.pt").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if path.is_dir():
        found = sorted(p for p in root.glob("step-*") if (p / "client.pt").is_file())
        if found:
            return found[-1]
        if (path / "config.json").is_file() or root.name == "checkpoints":
            raise CheckpointError(f"{path} is a run directory without a complete checkpoint yet")
    return None


def run_model_state(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The full MoCoV3 state dict (fp32 on CPU) of a run checkpoint directory, any backend."""
    if (ckpt_dir / "model.pt").is_file():
        state = load_safely(ckpt_dir / "model.pt")
        return state["model"], "run (single/ddp)"
    if (ckpt_dir / "dcp").is_dir():
        return _dcp_model_state(ckpt_dir / "dcp"), "run (fsdp)"
    if (ckpt_dir / "engine").is_dir():
        return _deepspeed_model_state(ckpt_dir), "run (deepspeed)"
    raise CheckpointError(f"{ckpt_dir} holds no model.pt, dcp/ or engine/: not a checkpoint of this project")


def _dcp_model_state(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """FSDP2's sharded files read whole, on one process (no process group needed)."""
    state: dict[str, Any] = {}
    try:  # in memory, as torch's own dcp_to_torch_save does it (private names: imported here, with a fallback)
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        # DCP unpickles its metadata and non-tensor entries: checked first, so nothing in them can run.
        dcp_load_safely(lambda **kw: _load_state_dict(state, no_dist=True, **kw), dcp_dir, _EmptyStateDictLoadPlanner)
    except ImportError:  # private names moved: the public converter, through a temporary file
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        check_file(dcp_dir / ".metadata")
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(dcp_dir), f"{tmp}/state.pt")
            state = load_safely(f"{tmp}/state.pt")
    model = state.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{dcp_dir} has no 'model' entry (keys: {sorted(state)[:5]})")
    return {k: v.float() if v.is_floating_point() else v for k, v in model.items() if torch.is_tensor(v)}


def _deepspeed_model_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's partitions (any ZeRO stage, any world size) consolidated to fp32 by its own tool."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional dependency
    except ImportError:
        raise CheckpointError(f"{ckpt_dir} is a DeepSpeed checkpoint: reading it needs pip install deepspeed") from None
    error = check_files(sorted((ckpt_dir / "engine").glob("*.pt")))  # DeepSpeed's tool unpickles them
    if error:
        raise CheckpointError(error)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag="engine")
    # Parameters outside the optimizer (the frozen patch projection and position table, the momentum
    # encoder) have no fp32 master: under ZeRO-1/2 they are whole in the module file, in the training
    # precision they were used in (ZeRO-3 keeps them as empty placeholders there; its consolidation
    # already includes them).
    module_file = ckpt_dir / "engine" / "mp_rank_00_model_states.pt"  # ZeRO-1/2 (ZeRO-3: one per rank)
    module = {}
    if module_file.is_file():
        module = load_safely(module_file).get("module") or {}
    full = {k: v for k, v in module.items() if torch.is_tensor(v) and v.numel() > 0}
    full.update(sd)
    return {k: v.float() if v.is_floating_point() else v for k, v in full.items()}


def architecture(ckpt: Any, model: str | None, path: Path) -> str:
    """`model`, or the architecture a checkpoint file names ('arch', as the authors' releases)."""
    arch = ckpt.get("arch") if isinstance(ckpt.get("arch"), str) else None
    name = model or arch
    if name is None or (name not in VIT_PRESETS and name not in VIT_ALIASES and not is_resnet(name)):
        raise CheckpointError(f"cannot tell the architecture of {path} (arch={arch!r}); pass --model with one of "
                              f"{', '.join([*sorted(VIT_PRESETS), *RESNET_PRESETS])}")  # fmt: skip
    return name


def backbone_from_args(args) -> LoadedBackbone:
    if getattr(args, "trust_checkpoint_code", False):
        trust_checkpoint_code()
    loaded = load_frozen_backbone(args.checkpoint, model=args.model, encoder=args.encoder)
    return random_init_like(loaded) if args.random_init else loaded


def load_frozen_backbone(
    source: str | Path, model: str | None = None, encoder: str = "base_encoder", **vit_overrides
) -> LoadedBackbone:
    """The backbone of `source`, loaded strictly, in eval mode with every parameter frozen.

    Raises:
        FileNotFoundError: no such file or directory.
        CheckpointError: a checkpoint of another architecture (the keys and shapes that differ are
            named), or one whose architecture cannot be told without `model`.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; give a run directory, a checkpoint "
                                "directory or a .pth file")  # fmt: skip
    step, config = None, None
    if is_export(path):  # an export folder: its own description builds the backbone
        meta = read_export_meta(path)
        backbone = load_export(path, with_head=False, **vit_overrides)
        backbone.eval()
        backbone.requires_grad_(False)
        name = meta.get("model") or meta["config"].get("name") or model or "vit"
        log.info("backbone %s (export) from %s", name, path)
        return LoadedBackbone(backbone, str(path), "export", name, None, None)
    ckpt_dir = resolve_run_checkpoint(path)
    if ckpt_dir is not None:
        client = load_safely(ckpt_dir / "client.pt")
        config, step = client.get("config"), int(client.get("step", 0))
        sd, kind = run_model_state(ckpt_dir)
        backbone = _backbone_from_config(config, model, vit_overrides)
        name = config["model"]["name"]
        state: Any = sd
        source_name = str(ckpt_dir)
    else:
        state = read_checkpoint(path)
        name = architecture(state, model, path)
        backbone = build_backbone(name, **vit_overrides)
        keys = state.get("state_dict", state.get("model", state))
        kind = "moco" if any("base_encoder." in k for k in keys) else "torchvision" if is_resnet(name) else "timm"
        source_name = str(path)
    load_backbone(backbone, backbone_state_dict(state, encoder=encoder))
    backbone.eval()
    backbone.requires_grad_(False)
    log.info("backbone %s (%s, %s) from %s%s", name, kind, encoder, source_name,
             f" at step {step}" if step is not None else "")  # fmt: skip
    return LoadedBackbone(backbone, source_name, kind, name, step, config)


def _backbone_from_config(config: dict | None, model: str | None, overrides: dict) -> VisionTransformer | ResNet:
    """The backbone a run was trained with (its resolved config), or `model` when given."""
    if config is None:
        raise CheckpointError("the run checkpoint has no config in client.pt")
    cfg = config_from_dict(config)
    m = cfg.model
    if model is not None and model != m.name:
        raise CheckpointError(f"--model {model} but the run trained {m.name}; leave --model out for run checkpoints")
    return build_backbone(m.name, **{**m.vit_overrides(), **overrides})


def random_init_like(loaded: LoadedBackbone) -> LoadedBackbone:
    """The same architecture at the initial weights its run started from (seeded as the trainer
    seeds the model: `run.seed`, the whole MoCo model built, its base encoder taken), frozen: the
    baseline a pretrained backbone is compared with."""
    if loaded.config is None:
        raise CheckpointError("--random-init needs a run checkpoint of this project (its config and seed)")
    cfg = config_from_dict(loaded.config)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).base_encoder.eval().requires_grad_(False)
    return LoadedBackbone(model, f"{loaded.source} (random init)", "random init", loaded.name, 0, loaded.config)
