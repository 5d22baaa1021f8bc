"""Vision Transformers as MoCo v3 trains them (paper Sec. 4-6, authors' `vits.py`).

Parameter names follow timm's `VisionTransformer` (patch_embed.proj, cls_token, pos_embed,
blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head) so that state dicts
move both ways between the two.

Shape legend: B batch, C image channels, H/W image height/width, G patch grid side (H / patch),
P patches (G * G), N tokens (P + 1 with a class token), D width, h heads, d head width (D / h).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend

POS_EMBEDS = ("sincos", "learned", "none")
POOLS = ("cls", "avg")


@dataclass(frozen=True)
class ViTConfig:
    """Everything that defines a backbone. Presets live in `VIT_PRESETS`."""

    img_size: int = 224
    """Side of the square input crop, in pixels; must be divisible by `patch_size`."""
    patch_size: int = 16
    """Side of a square patch (16 for S/B/L, 14 for H, 7 for the '/7' models)."""
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    """LayerNorm eps (1e-6 in the authors' code, not PyTorch's 1e-5)."""
    use_bn: bool = False
    """ViT-BN: BatchNorm instead of LayerNorm in the MLP sub-blocks only (paper Sec. 6, Fig. 8)."""
    pos_embed: str = "sincos"
    """'sincos' (fixed 2-D table, default), 'learned' or 'none' (paper Table 4 ablation)."""
    pool: str = "cls"
    """'cls': class token after the final LayerNorm; 'avg': no class token, mean of the patch
    tokens and no final LayerNorm (paper ablation)."""
    random_patch_proj: bool = True
    """Freeze the randomly initialised patch projection (paper Sec. 4.2, the stability trick)."""
    conv_stem: bool = False
    """Replace the patchify projection by 4 x (conv3x3-s2 + BN + ReLU) + conv1x1 (Xiao et al.);
    the presets then use one transformer block fewer, as the authors' `vit_conv_*`."""
    drop_path_rate: float = 0.0
    """Stochastic depth for fine-tuning (DeiT: 0.1): block i drops its residual branches with
    probability rate * i / (depth - 1) in training (timm's DropPath). 0 in pretraining (the authors')."""

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.pool == "cls" else 0)

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


_S = dict(embed_dim=384, depth=12, num_heads=12)  # 12 heads as the paper, not DeiT-S's 6
_B = dict(embed_dim=768, depth=12, num_heads=12)
_L = dict(embed_dim=1024, depth=24, num_heads=16)
_H = dict(embed_dim=1280, depth=32, num_heads=16)

VIT_PRESETS: dict[str, ViTConfig] = {
    "vit_small": ViTConfig(patch_size=16, **_S),
    "vit_base": ViTConfig(patch_size=16, **_B),
    "vit_large": ViTConfig(patch_size=16, **_L),
    "vit_huge": ViTConfig(patch_size=14, **_H),
    "vit_large_p7": ViTConfig(patch_size=7, **_L),
    "vit_bn_large_p7": ViTConfig(patch_size=7, use_bn=True, **_L),
}
# Short names as the paper writes them (S/16 ... BN-L/7).
VIT_ALIASES = {
    "vit_s16": "vit_small",
    "vit_b16": "vit_base",
    "vit_l16": "vit_large",
    "vit_h14": "vit_huge",
    "vit_l7": "vit_large_p7",
    "vit_bn_l7": "vit_bn_large_p7",
}


def resolve_vit_config(name: str, **overrides) -> ViTConfig:
    """The config of preset `name` with `overrides` applied and checked.

    Raises:
        ValueError: unknown name or override key, or an impossible combination; the message lists
            the valid choices.
    """
    key = VIT_ALIASES.get(name, name)
    if key not in VIT_PRESETS:
        valid = sorted(VIT_PRESETS) + sorted(VIT_ALIASES)
        raise ValueError(f"unknown ViT model {name!r}; choose one of: {', '.join(valid)}")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown ViT override(s) {unknown} for {name!r}; valid overrides: {', '.join(sorted(fields))}"
        )
    base = VIT_PRESETS[key]
    if overrides.get("conv_stem") and "depth" not in overrides:
        overrides = {**overrides, "depth": base.depth - 1}  # the authors' "minus one ViT block"
    if overrides.get("conv_stem") and "random_patch_proj" not in overrides:
        overrides = {**overrides, "random_patch_proj": False}
    cfg = dataclasses.replace(base, **overrides)
    validate_vit_config(cfg)
    return cfg


def validate_vit_config(cfg: ViTConfig) -> None:
    """Raise a ValueError that says what to change when `cfg` cannot be built."""
    if cfg.pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed={cfg.pos_embed!r} is not one of {POS_EMBEDS}")
    if cfg.pool not in POOLS:
        raise ValueError(f"pool={cfg.pool!r} is not one of {POOLS}")
    if cfg.patch_size < 1 or cfg.img_size < cfg.patch_size or cfg.img_size % cfg.patch_size:
        raise ValueError(
            f"img_size={cfg.img_size} is not divisible by patch_size={cfg.patch_size}; "
            f"use a multiple of {cfg.patch_size} (e.g. {max(1, cfg.img_size // cfg.patch_size) * cfg.patch_size})"
        )
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim={cfg.embed_dim} is not divisible by num_heads={cfg.num_heads}")
    if cfg.pos_embed == "sincos" and cfg.embed_dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs embed_dim divisible by 4, got {cfg.embed_dim}")
    if cfg.depth < 1:
        raise ValueError(f"depth must be at least 1, got {cfg.depth}")
    if not 0 <= cfg.drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}")
    if cfg.conv_stem:
        if cfg.patch_size != 16:
            raise ValueError(f"conv_stem downsamples by 16; it needs patch_size=16, got {cfg.patch_size}")
        if cfg.embed_dim % 8:
            raise ValueError(f"conv_stem needs embed_dim divisible by 8, got {cfg.embed_dim}")
        if cfg.random_patch_proj:
            raise ValueError("conv_stem is trained, not frozen: set random_patch_proj=False with conv_stem=True")


def sincos_pos_embed(grid_size: int, dim: int, class_token: bool = True, temperature: float = 10000.0) -> torch.Tensor:
    """The fixed 2-D sin-cos position table, shape (1, N, D).

    Channel quarters are sin(a * w_i), cos(a * w_i), sin(b * w_i), cos(b * w_i) with
    w_i = 1 / temperature^(i / (D/4)), where for patch token t (row-major over the grid) a = t // G
    (its row) and b = t % G (its column). The authors' code names the first pair 'w' but, through
    `meshgrid`'s 'ij' indexing, feeds it the row index; this table reproduces theirs bit for bit.
    The class-token slot is all zeros.
    """
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float32), torch.arange(grid_size, dtype=torch.float32), indexing="ij"
    )
    out_r = rows.flatten()[:, None] * omega[None, :]  # (P, D/4)
    out_c = cols.flatten()[:, None] * omega[None, :]  # (P, D/4)
    table = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)  # (P, D)
    if class_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)  # (N, D)
    return table[None]


class PatchEmbed(nn.Module):
    """Patchify: one conv with kernel = stride = patch, (B, C, H, W) -> (B, P, D)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, G, G) -> (B, P, D)


class ConvStem(nn.Module):
    """Convolutional stem (Xiao et al. 2021, paper's ablation): 4 x (conv3x3-s2, BN, ReLU), conv1x1."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.patch_size = cfg.patch_size
        layers: list[nn.Module] = []
        c_in, c_out = cfg.in_chans, cfg.embed_dim // 8
        for _ in range(4):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, cfg.embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, G, G) -> (B, P, D)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over tokens, for ViT-BN's MLP sub-blocks: statistics per channel over B x N.

    Input and output are (B, N, D). `channels_last` tells cross-rank BatchNorm converters (see
    `scale.parallel.sync_batchnorm`) that the channel dimension is the last one.
    """

    channels_last = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)  # (B, D, N) for BatchNorm1d


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, cfg.embed_dim * 3, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)


def attention_backend(cfg: ViTConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel `scaled_dot_product_attention` picks for this ViT's attention on `device` in
    `dtype` ('FLASH_ATTENTION', 'EFFICIENT_ATTENTION', 'CUDNN_ATTENTION' or 'MATH'), asked of torch's
    own dispatcher with tensors of the real shape (1, h, N, d); 'unknown' if this torch cannot say."""
    head_dim = cfg.embed_dim // cfg.num_heads
    q = torch.zeros(1, cfg.num_heads, cfg.num_tokens, head_dim, device=device, dtype=dtype)
    try:
        choice = int(torch._fused_sdp_choice(q, q, q))
    except (AttributeError, ImportError, RuntimeError):
        return "unknown"
    names = {int(getattr(SDPBackend, n)): n for n in dir(SDPBackend) if n.isupper()}
    return names.get(choice, str(choice))


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_hidden_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; ViT-BN swaps only `norm2` (before the MLP) to BatchNorm. With
    `drop_path` > 0 (fine-tuning), timm's DropPath on both residual branches (no parameters)."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = TokenBatchNorm(cfg.embed_dim) if cfg.use_bn else nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        if drop_path > 0:
            from timm.layers import DropPath  # fine-tuning only

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(cfg: ViTConfig) -> list[float]:
    """Each block's stochastic-depth probability: linear from 0 to `drop_path_rate` (timm, DeiT)."""
    if cfg.depth == 1:
        return [0.0]
    return [cfg.drop_path_rate * i / (cfg.depth - 1) for i in range(cfg.depth)]


class VisionTransformer(nn.Module):
    """ViT backbone. `forward` returns `head(pooled features)`; `head` is the identity until MoCo
    v3 attaches its projector there (the authors' layout, kept for checkpoint interop)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        validate_vit_config(cfg)
        self.cfg = cfg
        self.num_features = self.embed_dim = cfg.embed_dim
        self.patch_embed = ConvStem(cfg) if cfg.conv_stem else PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.pool == "cls" else None
        if cfg.pos_embed == "none":
            self.pos_embed = None
        else:
            # A Parameter even when fixed, as in the authors' code and timm: same state-dict keys,
            # same parameter counts. The fixed table is frozen and never reaches an optimizer.
            self.pos_embed = nn.Parameter(
                torch.zeros(1, cfg.num_tokens, cfg.embed_dim), requires_grad=cfg.pos_embed == "learned"
            )
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in drop_path_rates(cfg))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.pool == "cls" else nn.Identity()
        self.head: nn.Module = nn.Identity()
        self.feature_sink: Callable[[torch.Tensor], None] | None = None
        """Called by `forward` with the detached pooled features (B, D) it computed (the dense kNN
        monitor's bank is filled from them: no extra forward). Not part of the state."""
        if cfg.random_patch_proj:
            self.patch_embed.proj.weight.requires_grad_(False)
            self.patch_embed.proj.bias.requires_grad_(False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation; call again after materialising a meta-device model.

        qkv: three D x D matrices, each uniform(+-sqrt(6 / (D + D))); every other Linear
        xavier-uniform with zero bias; class token normal(std 1e-6); patch projection
        xavier-uniform with fan 3 * p * p + D and zero bias; norms at (1, 0); conv-stem
        convolutions at PyTorch's default. The head is left
        alone (MoCo's projector keeps PyTorch's default Linear init, as the authors').
        """
        head = set(self.head.modules())
        for name, m in self.named_modules():
            if m in head:
                continue
            if isinstance(m, nn.Linear):
                if name.endswith("attn.qkv"):
                    bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.Conv2d)):
                m.reset_parameters()
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if isinstance(self.patch_embed, PatchEmbed):
            proj = self.patch_embed.proj
            bound = math.sqrt(6.0 / float(self.cfg.in_chans * self.cfg.patch_size**2 + self.cfg.embed_dim))
            nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)
        if self.cfg.pos_embed == "sincos":
            table = sincos_pos_embed(self.cfg.grid_size, self.cfg.embed_dim, class_token=self.cls_token is not None)
            self.pos_embed.copy_(table)
        elif self.cfg.pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens after the last block and final norm, (B, N, D)."""
        if x.shape[-2:] != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(
                f"input is {tuple(x.shape[-2:])} px but this ViT was built for img_size={self.cfg.img_size}; "
                "build it with a matching img_size"
            )
        x = self.patch_embed(x)  # (B, P, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, D) -> pooled (B, D), then the head unless `pre_logits`."""
        x = x[:, 0] if self.cfg.pool == "cls" else x.mean(dim=1)  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, views: int = 1) -> torch.Tensor:
        """(V * B, C, H, W) -> head outputs (V * B, F). With `views` > 1 the input holds V views of
        B images stacked along the batch: the backbone runs on all at once (nothing in it mixes
        samples, unless ViT-BN or the conv stem: see `scale.models.moco.mixes_samples`) and the head
        on each view in turn (its BatchNorm statistics stay per view)."""
        pooled = self.forward_head(self.forward_features(x), pre_logits=True)  # (V * B, D)
        return head_views(self.head, pooled, views, self.feature_sink)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> pooled backbone features (B, D), without the head: for kNN and linear
        probes. Its own method so that sharding wrappers can gather parameters for it."""
        return self.forward_head(self.forward_features(x), pre_logits=True)


def head_views(head: nn.Module, pooled: torch.Tensor, views: int,
               sink: Callable[[torch.Tensor], None] | None) -> torch.Tensor:  # fmt: skip
    """A backbone's pooled features (V * B, D) through its head, each view's statistics on their own;
    `sink` (a monitor's tap) first gets each view's detached features, in order (no copy, no grad)."""
    if sink is not None:
        for part in pooled.detach().chunk(views):
            sink(part)
    if views == 1:
        return head(pooled)
    if getattr(head, "per_view", False):
        return head(pooled, views=views)
    return torch.cat([head(part) for part in pooled.chunk(views)])


def build_vit(name: str, **overrides) -> VisionTransformer:
    """Build a preset backbone (see `VIT_PRESETS` and `VIT_ALIASES`) with config overrides.

    Builds on the current default device, so `with torch.device("meta"): build_vit("vit_huge")`
    costs no memory; call `init_weights()` after `to_empty()` to materialise it.

    Example:
        >>> model = build_vit("vit_small", img_size=32, patch_size=8)
    """
    return VisionTransformer(resolve_vit_config(name, **overrides))


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
