"""MoCo v3 (paper Algorithm 1; authors' `moco/builder.py`), with the cross-rank key gather injected.

Shape legend: B local batch (one view, this rank), V views (2), W world size, K = W * B keys in
all, D backbone width, F feature dim of the heads (256).

Joint views. A plain ViT backbone has no operation that mixes samples (LayerNorm, attention and the
MLP act on one image at a time), so both views can go through each backbone as one batch of 2B and
be split only before the heads, whose BatchNorm keeps per-view statistics: the same loss and
gradients as the authors' per-view forwards (tested to 1e-5), with each encoder called once per
step. Sharded backends (FSDP2, ZeRO-3) then gather every parameter once per forward, not twice, and
the matmuls are twice as tall. Backbones with BatchNorm before the head (ViT-BN, the conv stem,
every ResNet) keep per-view forwards: their statistics must be per view.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from scale.models.resnet import ResNet, ResNetConfig, build_resnet, is_resnet, resolve_resnet_config
from scale.models.vit import VisionTransformer, ViTConfig, build_vit, resolve_vit_config
from scale.views import join_views

VIEW_FORWARDS = ("auto", "joint", "per_view")


class KeyGather(Protocol):
    """Concatenates the keys of every rank, in rank order, without autograd: (B, F) -> (K, F).

    `rank` is this process's index, used to offset the positive labels by `rank * B`.
    """

    rank: int

    def __call__(self, keys: torch.Tensor) -> torch.Tensor: ...


class LocalKeys:
    """The single-process gather: the keys are all the keys. Needs no process group."""

    rank = 0

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        return keys


class ViewwiseMLP(nn.Sequential):
    """An MLP head whose BatchNorms normalise each view on its own: `forward(x, views=V)` takes the
    V views stacked along the batch, (V * B, F_in), runs each layer on each (B, F_in) part (the
    statistics and the running-average updates of per-view calls: every BatchNorm sees view 1,
    then view 2) and returns (V * B, F_out). One call per step, so a sharded backend gathers its
    weights once; a BatchNorm that takes all views at once (`takes_views`: the cross-rank one of
    `scale.parallel`) reduces their statistics in one collective."""

    per_view = True  # `VisionTransformer.forward` passes `views` to a head that says so

    def forward(self, x: torch.Tensor, views: int = 1) -> torch.Tensor:
        if views == 1:
            return super().forward(x)
        parts = list(x.chunk(views))  # V x (B, F)
        for layer in self:  # called as modules: the hooks of a sharded backend run
            parts = layer(parts) if getattr(layer, "takes_views", False) else [layer(part) for part in parts]
        return torch.cat(parts)


def mixes_samples(backbone: nn.Module) -> bool:
    """Whether `backbone` (its head aside) has an operation that mixes the samples of a batch:
    BatchNorm in ViT-BN's blocks, the conv stem or a ResNet. Such a backbone needs per-view forwards."""
    head = set(getattr(backbone, "head", nn.Identity()).modules())
    return any(isinstance(m, _BatchNorm) for m in backbone.modules() if m not in head)


def resolve_view_forward(view_forward: str, mixes: bool) -> bool:
    """'auto' / 'joint' / 'per_view' -> whether both views go through each encoder as one batch,
    for a backbone that `mixes` samples (`mixes_samples`; from a config: ViT-BN, the conv stem, ResNet).

    Raises:
        ValueError: unknown value, or 'joint' for a backbone with BatchNorm before the head (the
            statistics of the joint batch would change the results).
    """
    if view_forward not in VIEW_FORWARDS:
        raise ValueError(f"view_forward={view_forward!r} is not one of {', '.join(VIEW_FORWARDS)}")
    if view_forward == "per_view":
        return False
    if mixes:
        if view_forward == "joint":
            raise ValueError(
                "--model.view_forward=joint would compute this backbone's BatchNorm statistics (ViT-BN blocks "
                "the conv stem or a ResNet) over both views at once, which changes the results; use auto or per_view"
            )
        return False
    return True


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> ViewwiseMLP:
    """Projector / predictor: bias-free Linear, BN + ReLU after hidden layers, affine-free BN last
    (unless not `last_bn`: the authors' ResNet predictor).

    The module indices (0, 1, 2, ...) are the authors', so checkpoints load unchanged.
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in = input_dim if i == 0 else mlp_dim
        dim_out = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return ViewwiseMLP(*layers)


class MoCoV3(nn.Module):
    """Base encoder (backbone + projector), predictor, momentum encoder: the authors' `MoCo_ViT`
    (3-layer projector, predictor ending in BatchNorm) or `MoCo_ResNet` (2-layer projector, predictor
    without its last BatchNorm), by the backbone.

    Args:
        backbone: a `VisionTransformer` or a `ResNet`; its head (`head`, a ResNet's `fc`) is
            replaced by the projector, as the authors.
        dim: output feature dimension F of both heads (256).
        mlp_dim: hidden width of both heads (4096).
        temperature: softmax temperature tau (0.2 for ViT, 1.0 for ResNet).
        key_gather: cross-rank key gather (see `KeyGather`); `LocalKeys()` for one process.
        view_forward: 'auto' (joint views unless the backbone has BatchNorm before its head),
            'joint' or 'per_view' (the authors' order: one forward per view); see the module text.
    """

    def __init__(
        self,
        backbone: VisionTransformer | ResNet,
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.2,
        key_gather: KeyGather | None = None,
        view_forward: str = "auto",
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.key_gather: KeyGather = key_gather or LocalKeys()
        resnet = isinstance(backbone, ResNet)  # MoCo_ResNet's heads, else MoCo_ViT's
        setattr(backbone, getattr(backbone, "head_name", "head"), build_mlp(2 if resnet else 3, backbone.num_features,
                                                                            mlp_dim, dim))  # fmt: skip
        self.base_encoder = backbone
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=not resnet)
        # The momentum encoder starts as an exact copy and is never trained by gradient.
        self.momentum_encoder = copy.deepcopy(backbone)
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)
        self.joint_views = resolve_view_forward(view_forward, mixes_samples(backbone))

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(momentum params, base params) that the EMA moves, matched by name.

        Params frozen in the base encoder (random patch projection, sin-cos table) are equal in
        both encoders by construction and left out, so they stay bitwise equal.
        """
        base = dict(self.base_encoder.named_parameters())
        ks, qs = [], []
        for name, k in self.momentum_encoder.named_parameters():
            q = base[name]
            if q.requires_grad:
                ks.append(k)
                qs.append(q)
        return ks, qs

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """k <- momentum * k + (1 - momentum) * q, for every trainable backbone + projector param."""
        ks, qs = self.momentum_pairs()
        if ks:
            # The authors' `k * m + q * (1 - m)` in the same operation order, in place on all tensors.
            torch._foreach_mul_(ks, momentum)
            torch._foreach_add_(ks, qs, alpha=1.0 - momentum)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of queries (B, F) against the keys of all ranks, times 2 * tau (authors' scaling).

        Runs in fp32 at least, outside any autocast region: in bf16 the logits q k^T / tau (up to
        1 / 0.2 = 5) keep under 3 significant digits, and the softmax over thousands of keys suffers.
        """
        return self.loss_against(q, self.gathered_keys(k), q.shape[0] * self.key_gather.rank)

    @torch.no_grad()
    def gathered_keys(self, k: torch.Tensor) -> torch.Tensor:
        """Keys (B, F) normalised in fp32 (at least) and concatenated over the ranks: (K, F)."""
        dtype = torch.promote_types(k.dtype, torch.float32)
        with torch.autocast(device_type=k.device.type, enabled=False):
            return self.key_gather(F.normalize(k.to(dtype), dim=1))

    def loss_against(self, q: torch.Tensor, k_all: torch.Tensor, offset: int) -> torch.Tensor:
        """InfoNCE of queries (B, F) against normalised keys (K, F) whose positives are rows
        `offset` .. `offset + B - 1`, times 2 * tau; fp32 at least, outside autocast."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q = F.normalize(q.to(dtype), dim=1)
            logits = q @ k_all.to(dtype).T / self.temperature  # (B, K)
            labels = torch.arange(q.shape[0], device=q.device) + offset
            return F.cross_entropy(logits, labels) * (2 * self.temperature)

    @torch.no_grad()
    def keys(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views' keys from the momentum encoder, normalised and gathered over the ranks:
        (K, F) each (`--batch.keys=global` computes every micro-batch's keys first)."""
        if self.joint_views:
            k1, k2 = self.momentum_encoder(join_views(x1, x2), views=2).chunk(2)
        else:
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        return self.gathered_keys(k1), self.gathered_keys(k2)

    def queries(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views' queries: base encoder (with its projector), then the predictor; (B, F) each."""
        if self.joint_views:
            x = join_views(x1, x2)  # (2B, C, H, W)
            q1, q2 = self.predictor(self.base_encoder(x, views=2), views=2).chunk(2)
            return q1, q2
        return self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        momentum: float | None = None,
        keys: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        keys_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Symmetrised loss ctr(q1, k2) + ctr(q2, k1) for two views (B, C, H, W) each.

        Args:
            momentum: if given, the momentum update runs first (Algorithm 1). Sharded backends pass
                None and run `momentum_update` on their shards after the optimizer step instead.
            keys: (k1, k2, offset): keys already gathered (`keys`), e.g. those of every micro-batch
                of an accumulated step, with this micro-batch's positives at rows `offset` ..
                `offset + B - 1`; the momentum encoder does not run.
            keys_only: return `keys(x1, x2)` (through the wrapped module, so sharded backends gather).
        """
        if momentum is not None:
            self.momentum_update(momentum)
        if keys_only:
            return self.keys(x1, x2)
        if keys is not None:
            k1_all, k2_all, offset = keys
            q1, q2 = self.queries(x1, x2)
            return self.loss_against(q1, k2_all, offset) + self.loss_against(q2, k1_all, offset)
        if self.joint_views:
            x = join_views(x1, x2)  # (2B, C, H, W)
            q1, q2 = self.predictor(self.base_encoder(x, views=2), views=2).chunk(2)  # (B, F) each
            with torch.no_grad():
                k1, k2 = self.momentum_encoder(x, views=2).chunk(2)  # (B, F) each
            return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        q1 = self.predictor(self.base_encoder(x1))  # (B, F)
        q2 = self.predictor(self.base_encoder(x2))  # (B, F)
        with torch.no_grad():
            k1 = self.momentum_encoder(x1)  # (B, F)
            k2 = self.momentum_encoder(x2)  # (B, F)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


def build_backbone(name: str, **overrides) -> VisionTransformer | ResNet:
    """A ViT preset (`build_vit`) or a torchvision ResNet (`build_resnet`: 'resnet50', ...) by name;
    a ResNet takes only `img_size` of the ViT options and refuses the others when they are set."""
    if is_resnet(name):
        return build_resnet(name, **resnet_overrides(name, overrides))
    return build_vit(name, **overrides)


def resolve_backbone_config(name: str, **overrides) -> ViTConfig | ResNetConfig:
    """The backbone's config without building it; see `build_backbone`."""
    if is_resnet(name):
        return resolve_resnet_config(name, **resnet_overrides(name, overrides))
    return resolve_vit_config(name, **overrides)


# The ViT options and the values that mean "not set" for a ResNet (no patches, no tokens).
_VIT_ONLY = {"patch_size": None, "use_bn": None, "embed_dim": None, "depth": None, "num_heads": None,
             "pos_embed": "sincos", "pool": "cls", "conv_stem": False}  # fmt: skip


def resnet_overrides(name: str, overrides: dict) -> dict:
    """The ResNet options among ViT-style `overrides` (img_size); a ViT option set to anything but
    its default is an error (it cannot apply), the random patch projection is moot (no patches)."""
    given = [f"{k}={v!r}" for k, v in overrides.items() if k in _VIT_ONLY and v != _VIT_ONLY[k]]
    if given:
        raise ValueError(f"{', '.join(given)}: ViT options, which {name} does not have; drop them")
    return {k: v for k, v in overrides.items() if k not in _VIT_ONLY and k != "random_patch_proj"}


def build_moco(
    name: str,
    dim: int = 256,
    mlp_dim: int = 4096,
    temperature: float = 0.2,
    key_gather: KeyGather | None = None,
    view_forward: str = "auto",
    **vit_overrides,
) -> MoCoV3:
    """`MoCoV3(build_backbone(name, **vit_overrides), ...)`; builds on the default device (meta works)."""
    return MoCoV3(
        build_backbone(name, **vit_overrides), dim=dim, mlp_dim=mlp_dim, temperature=temperature, key_gather=key_gather,
        view_forward=view_forward,
    )  # fmt: skip
