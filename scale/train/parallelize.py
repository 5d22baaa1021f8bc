"""How MoCo v3 is laid out on the devices, in one place (in the spirit of torchtitan's per-model
`parallelize`): the model built from the config, its units for sharding (the momentum encoder
mirroring the base encoder's layout, so that its EMA runs on local shards), the blocks that
recompute their activations, the compiled regions, the cross-rank pieces (BatchNorm, the key
gather) and the backend's typed settings. `parallelize` applies them in torchtitan's order
(recompute, then compilation, then sharding); the trainer calls it once.

What depends on the backbone family lives in its `BackboneLayout` (`layout_of` picks it): a new
family (ViTs, ResNets) has a layout here and touches no backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from scale.config import Config, Derived
from scale.hardware.precision import autocast_dtype
from scale.models import MoCoV3, ResNet, ResNetConfig, build_moco, resolve_backbone_config
from scale.models.vit import VisionTransformer, ViTConfig, attention_backend
from scale.optim import build_optimizer, layer_decay_scale, param_groups
from scale.parallel.base import Backend
from scale.parallel.compile import compile_regions
from scale.parallel.dist import AllGatherKeys
from scale.parallel.recompute import apply_activation_checkpointing, recompute_mode
from scale.parallel.settings import BackendSettings, ShardingPlan
from scale.parallel.sync_batchnorm import convert_sync_batchnorm

log = logging.getLogger(__name__)


def build_model(cfg: Config) -> MoCoV3:
    """The MoCo v3 model of `cfg` on the default device (the meta device works), on one process."""
    m = cfg.model
    return build_moco(m.name, dim=m.dim, mlp_dim=m.mlp_dim, temperature=m.temperature, view_forward=m.view_forward,
                      **m.vit_overrides())  # fmt: skip


def backbone_config(cfg: Config) -> ViTConfig | ResNetConfig:
    """The backbone's configuration of `cfg` without building anything."""
    return resolve_backbone_config(cfg.model.name, **cfg.model.vit_overrides())


class BackboneLayout:
    """What laying MoCo out needs to know about one backbone family: its repeated blocks (units of
    sharding, recompute and compilation) and its layers for the gradient monitor."""

    low_precision = True
    """Whether a sharded backend may gather the blocks (their normalisations aside: `norm_units`)
    in the compute dtype: true where a block's own parameters only feed matmuls."""

    def blocks(self, encoder: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def norm_units(self, block: nn.Module) -> list[nn.Module]:
        """The modules of `block` sharded as units of their own, before it (gathered in fp32)."""
        return []

    def prepare(self, model: MoCoV3, backend: Backend) -> None:
        """Anything the family does to the model on `backend`'s device before it is wrapped."""

    def layers(self, model: MoCoV3) -> list[tuple[str, nn.Module]]:
        """(name, module) of the layers whose gradient norms the monitor follows, first layer first."""
        raise NotImplementedError

    def describe(self, model: MoCoV3, device: torch.device, precision: str) -> str:
        """How the step computes, for the start-up log."""
        return ""


class ViTLayout(BackboneLayout):
    """Vision Transformers: every transformer block is a unit."""

    def blocks(self, encoder: VisionTransformer) -> list[nn.Module]:
        return list(encoder.blocks)

    def norm_units(self, block: nn.Module) -> list[nn.Module]:
        return _norms(block)

    def layers(self, model: MoCoV3) -> list[tuple[str, nn.Module]]:
        """The patch projection (when it is learned), each block, the projector and the predictor; the
        class token, position table and final norm are left out (no layer of the paper's Fig. 4)."""
        enc = model.base_encoder
        return [("patch_embed", enc.patch_embed), *((f"block.{i}", b) for i, b in enumerate(enc.blocks)),
                *_heads(model)]  # fmt: skip

    def describe(self, model: MoCoV3, device: torch.device, precision: str) -> str:
        vit = model.base_encoder.cfg
        kernel = attention_backend(vit, device, autocast_dtype(precision) or torch.float32)
        head_width = vit.embed_dim // vit.num_heads
        out = (f"attention: scaled_dot_product_attention with the {kernel} kernel ({precision}, {vit.num_tokens} "
               f"tokens, head width {head_width})")  # fmt: skip
        if not isinstance(model, MoCoV3):
            return out
        views = ("as one batch (joint views)" if model.joint_views
                 else "one view at a time (BatchNorm before the head needs per-view statistics)")  # fmt: skip
        return f"{out}; both views through each encoder {views}"


class ResNetLayout(BackboneLayout):
    """ResNets: each of the four stages (`layer1` ... `layer4`) is a unit, the stem and the projector
    stay with the encoder; everything is gathered in fp32 (the BatchNorms sit between the
    convolutions, whose weights autocast casts). On CUDA the convolutions run channels-last."""

    low_precision = False

    def blocks(self, encoder: ResNet) -> list[nn.Module]:
        return [encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]

    def layers(self, model: MoCoV3) -> list[tuple[str, nn.Module]]:
        """The stem's convolution (the first layer, as the patch projection of a ViT), each residual
        block, the projector and the predictor."""
        enc = model.base_encoder
        blocks = [(f"{stage}.{i}", b) for stage in ("layer1", "layer2", "layer3", "layer4")
                  for i, b in enumerate(getattr(enc, stage))]  # fmt: skip
        return [("conv1", enc.conv1), *blocks, *_heads(model)]

    def prepare(self, model: MoCoV3, backend: Backend) -> None:
        """Channels-last on CUDA (cuDNN's layout for tensor cores): the inputs always, the weights too
        where the backend keeps them as they are (one process, DDP); sharded and DeepSpeed backends
        flatten them into contiguous buffers, and cuDNN then converts the weights per call."""
        if backend.device.type != "cuda":
            return
        weights = backend.name in ("single", "ddp")
        for enc in _encoders(model):
            if weights:
                enc.to_channels_last()
            else:
                enc.channels_last = True
        if backend.is_main:
            kept = " and weights" if weights else f" ({backend.name} flattens the weights: cuDNN converts them)"
            log.info("convolutions channels-last: inputs%s", kept)

    def describe(self, model: MoCoV3, device: torch.device, precision: str) -> str:
        enc = model.base_encoder
        memory = "channels-last" if enc.channels_last else "channels-first"
        out = f"convolutions {memory} ({precision}, {enc.cfg.name} at {enc.cfg.img_size} px)"
        if not isinstance(model, MoCoV3):
            return out
        return f"{out}; one view at a time through each encoder (every BatchNorm needs per-view statistics)"


LAYOUTS: list[tuple[type[nn.Module], BackboneLayout]] = [(VisionTransformer, ViTLayout()), (ResNet, ResNetLayout())]


def _encoders(model: nn.Module) -> list[nn.Module]:
    """The base encoder and, where there is one, the momentum encoder (MoCo's, or a classifier's EMA)."""
    return [e for e in (model.base_encoder, getattr(model, "momentum_encoder", None)) if e is not None]


def _heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The gradient monitor's last layers: MoCo's projector and predictor, or a classifier's head."""
    if isinstance(model, MoCoV3):
        return [("projector", model.base_encoder.head), ("predictor", model.predictor)]
    return [("classifier", model.base_encoder.head)]


def layout_of(model: MoCoV3) -> BackboneLayout:
    for backbone, layout in LAYOUTS:
        if isinstance(model.base_encoder, backbone):
            return layout
    raise TypeError(f"no layout for a {type(model.base_encoder).__name__} backbone (scale.train.parallelize)")


def sharding_plan(model: MoCoV3) -> ShardingPlan:
    """Shard every block of both encoders (a ViT's normalisation layers first, as units of their own
    gathered in fp32: the precision policy of docs/training.md keeps them fp32; the rest of a block
    only feeds matmuls and may be gathered in bf16; a ResNet's stages whole, in fp32), then the
    encoders and the predictor; the momentum encoder gets exactly the base encoder's layout (its EMA
    then runs on local shards)."""
    layout = layout_of(model)
    encoders = _encoders(model)
    mom = encoders[1:]  # forward only: MoCo's momentum encoder, a classifier's EMA
    blocks = [b for e in encoders for b in layout.blocks(e)]
    units = [u for block in blocks for u in (*layout.norm_units(block), block)]
    predictor = [model.predictor] if isinstance(model, MoCoV3) else []
    return ShardingPlan(
        units=[*units, *encoders, *predictor],
        low_precision=blocks if layout.low_precision else [],
        forward_methods=[(e, "pooled_features") for e in encoders],
        forward_only=[*(u for m in mom for b in layout.blocks(m) for u in (*layout.norm_units(b), b)), *mom],
        sequences=[[[block, *layout.norm_units(block)] for block in layout.blocks(e)] for e in encoders],
    )


def _norms(block: nn.Module) -> list[nn.Module]:
    """The normalisation layers of a block (LayerNorm, BatchNorm) that hold parameters."""
    kinds = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
    return [m for m in block.modules() if isinstance(m, kinds) and any(True for _ in m.parameters())]


def compiled_regions(model: MoCoV3) -> list[nn.Module]:
    """What `--model.compile` compiles: each block of both encoders (one graph for all: the same
    code), both projectors and the predictor."""
    layout = layout_of(model)
    encoders = _encoders(model)
    predictor = [model.predictor] if isinstance(model, MoCoV3) else []
    return [*(b for e in encoders for b in layout.blocks(e)), *(e.head for e in encoders), *predictor]


def recomputed_blocks(model: MoCoV3) -> list[nn.Module]:
    """The blocks that recompute their activations in the backward (the base encoder's: the momentum
    encoder keeps none)."""
    return layout_of(model).blocks(model.base_encoder)


def grad_groups(model: MoCoV3) -> list[tuple[str, list[nn.Parameter]]]:
    """(layer name, trainable parameters) of the gradient monitor's layers, first layer first."""
    out = []
    for name, module in layout_of(model).layers(model):
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            out.append((name, params))
    return out


def backend_settings(cfg: Config, derived: Derived) -> BackendSettings:
    return BackendSettings(
        global_batch_size=derived.global_batch_size,
        batch_size_per_device=derived.batch_size_per_device,
        grad_accum_steps=derived.grad_accum_steps,
        clip_grad=cfg.optim.clip_grad,
        optimizer=cfg.optim.name,
        reshard_after_forward=cfg.parallel.reshard_after_forward,
        shard_size=cfg.parallel.shard_size,
    )


def optimizer_factory(cfg: Config, lr: float, described: list[str]) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """The optimizer of `cfg` over a module's parameters, as a backend builds it (on the module it
    holds, possibly sharded); appends its description to `described`."""

    def build(module: nn.Module) -> torch.optim.Optimizer:
        o = cfg.optim
        lr_scale = None
        if cfg.task == "finetune" and cfg.finetune.layer_decay < 1:  # fine-tuning's layer-wise lr decay (ViTs)
            lr_scale = layer_decay_scale(module.base_encoder.cfg.depth, cfg.finetune.layer_decay)
        groups = param_groups(module, o.exclude_norm_bias_from_wd, lr_scale)
        opt, description = build_optimizer(o.name, groups, lr, o.weight_decay, o.betas, o.eps, o.momentum,
                                           o.trust_coefficient, o.implementation)  # fmt: skip
        described.append(description)
        return opt

    return build


@dataclass
class LaidOut:
    """What `parallelize` did: the model the backend holds (`backend.module`) and descriptions for
    the start-up log."""

    model: MoCoV3
    optimizer: str
    compute: str


def parallelize(cfg: Config, backend: Backend, derived: Derived, model: MoCoV3 | None = None) -> LaidOut:
    """Build the MoCo v3 model of `cfg` (or take `model`, built from it: the simulator's fake one) and
    lay it out on `backend`'s devices: cross-rank BatchNorm and key gather with several ranks,
    activation recompute, compiled regions, then the backend's wrapping or sharding
    (`Backend.setup`) with the optimizer over what it holds."""
    model = model if model is not None else build_model(cfg)
    if backend.world_size > 1:
        convert_sync_batchnorm(model)
        if isinstance(model, MoCoV3):
            model.key_gather = AllGatherKeys()
    mode = recompute_mode(cfg.parallel.activation_checkpointing)
    if mode != "none":
        n = apply_activation_checkpointing(recomputed_blocks(model), selective=mode == "selective")
        if backend.is_main:
            log.info("activation recompute: %s, %d blocks of the base encoder", {
                "full": "every block's forward again in the backward",
                "selective": "matmul and attention outputs kept, the rest recomputed"}[mode], n)  # fmt: skip
    if cfg.model.compile:  # after recompute, before the backend shards or wraps the model
        regions = compile_regions(compiled_regions(model))
        if backend.is_main:
            log.info("torch.compile: %d regions (every block of both encoders, the two projectors and the "
                     "predictor), one graph per kind, compiled at the first step", regions)  # fmt: skip
    layout_of(model).prepare(model, backend)
    described: list[str] = []
    backend.setup(model, optimizer_factory(cfg, derived.lr, described), backend_settings(cfg, derived),
                  sharding_plan(model))  # fmt: skip
    compute = layout_of(model).describe(backend.module, backend.device, backend.precision)
    return LaidOut(backend.module, described[-1] if described else "", compute)
