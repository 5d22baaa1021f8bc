import math

import pytest
import torch
from torch import nn

from scale.models import VIT_ALIASES, VIT_PRESETS, build_vit, resolve_vit_config
from scale.models.formats import build_timm_vit, export_timm_state_dict, load_backbone
from scale.models.vit import TokenBatchNorm, count_params, sincos_pos_embed
from tests.helpers import TINY_VIT

# Paper Table 2 (backbone parameters).
TABLE2_PARAMS = {"vit_small": 22e6, "vit_base": 86e6, "vit_large": 304e6, "vit_huge": 632e6, "vit_bn_large_p7": 304e6}


@pytest.mark.parametrize("name", sorted(VIT_PRESETS))
def test_param_count_matches_timm_and_table2(name):
    cfg = resolve_vit_config(name)
    with torch.device("meta"):
        ours = build_vit(name)
    n = count_params(ours)
    if not cfg.use_bn:  # ViT-BN has no timm equivalent; BN and LN have the same parameters
        with torch.device("meta"):
            timm_model = build_timm_vit(cfg)
        assert n == sum(p.numel() for p in timm_model.parameters())
    if name in TABLE2_PARAMS:
        assert abs(n / TABLE2_PARAMS[name] - 1) < 0.02, f"{name}: {n / 1e6:.1f} M vs Table 2"


def test_flagship_models_build_on_meta_without_memory():
    for name in ("vit_huge", "vit_bn_large_p7"):
        with torch.device("meta"):
            model = build_vit(name)
        assert all(p.is_meta for p in model.parameters())


def test_aliases_resolve_to_presets():
    for alias, name in VIT_ALIASES.items():
        assert resolve_vit_config(alias) == resolve_vit_config(name)
    assert resolve_vit_config("vit_h14").patch_size == 14
    assert resolve_vit_config("vit_small").num_heads == 12  # not DeiT-S's 6


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("vit_gigantic", {}, "vit_small"),  # lists the valid names
        ("vit_base", {"img_size": 225}, "not divisible by patch_size=16"),
        ("vit_base", {"pos_embed": "rope"}, "sincos"),
        ("vit_base", {"pool": "max"}, "cls"),
        ("vit_base", {"drop_path": 0.1}, "valid overrides"),
        ("vit_base", {"conv_stem": True, "random_patch_proj": True}, "random_patch_proj=False"),
        ("vit_huge", {"conv_stem": True}, "patch_size=16"),
        ("vit_base", {"num_heads": 5}, "divisible by num_heads"),
    ],
)
def test_bad_names_and_overrides_raise_clear_errors(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_vit(name, **overrides)


def test_sincos_table_equals_closed_form():
    G, D = 4, 16
    model = build_vit("vit_small", img_size=G * 8, patch_size=8, embed_dim=D, depth=1, num_heads=4)
    table = model.pos_embed.detach()[0]  # (N, D)
    assert model.pos_embed.requires_grad is False
    assert torch.equal(table[0], torch.zeros(D))  # class-token slot
    q = D // 4
    for t in range(G * G):
        row, col = divmod(t, G)
        for i in range(q):
            w = 1.0 / 10000 ** (i / q)
            expected = [math.sin(row * w), math.cos(row * w), math.sin(col * w), math.cos(col * w)]
            got = [table[1 + t, j * q + i].item() for j in range(4)]
            assert got == pytest.approx(expected, abs=1e-6)


def test_sincos_table_reproduces_the_authors_meshgrid():
    # The authors' construction, transcribed: meshgrid(w, h) with 'ij' indexing, 'w' pair first.
    G, D = 5, 24
    grid_w, grid_h = torch.meshgrid(
        torch.arange(G, dtype=torch.float32), torch.arange(G, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000.0 ** (torch.arange(D // 4, dtype=torch.float32) / (D // 4))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    theirs = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    assert torch.equal(sincos_pos_embed(G, D, class_token=False)[0], theirs)


def test_random_patch_projection_is_frozen_and_gets_no_gradient():
    model = build_vit("vit_small", **TINY_VIT)
    proj = model.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert proj.weight.grad is None and proj.bias.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None
    trainable = build_vit("vit_small", random_patch_proj=False, **TINY_VIT)
    assert trainable.patch_embed.proj.weight.requires_grad


def test_vit_bn_has_batchnorm_exactly_in_the_mlp_sub_blocks():
    model = build_vit("vit_bn_large_p7", img_size=28, embed_dim=32, depth=3, num_heads=4)
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bn_names == [f"blocks.{i}.norm2" for i in range(3)]
    for block in model.blocks:
        assert isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, TokenBatchNorm)
    assert isinstance(model.norm, nn.LayerNorm)
    # BatchNorm statistics are per channel over batch and tokens.
    model.train()
    tokens = torch.randn(2, 17, 32) * 3 + 1
    out = model.blocks[0].norm2(tokens)
    assert out.shape == tokens.shape
    assert torch.allclose(out.mean(dim=(0, 1)), torch.zeros(32), atol=1e-5)


def test_authors_initialisation():
    D = 64
    model = build_vit("vit_base", img_size=32, patch_size=8, embed_dim=D, depth=2, num_heads=4)
    qkv = model.blocks[0].attn.qkv
    assert qkv.bias is not None and torch.count_nonzero(qkv.bias) == 0
    qkv_bound = math.sqrt(6.0 / (D + D))
    assert qkv.weight.abs().max() <= qkv_bound and qkv.weight.abs().max() > 0.9 * qkv_bound
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.weight.abs().max() <= math.sqrt(6.0 / (D + 4 * D))
    patch_bound = math.sqrt(6.0 / (3 * 8 * 8 + D))
    assert model.patch_embed.proj.weight.abs().max() <= patch_bound
    assert model.cls_token.abs().max() < 1e-5
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6


def test_meta_build_materialises_to_the_same_init():
    torch.manual_seed(3)
    direct = build_vit("vit_small", **TINY_VIT)
    torch.manual_seed(3)
    direct.init_weights()
    with torch.device("meta"):
        lazy = build_vit("vit_small", **TINY_VIT)
    lazy.to_empty(device="cpu")
    torch.manual_seed(3)
    lazy.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "overrides, num_tokens",
    [({"pos_embed": "learned"}, 17), ({"pos_embed": "none"}, 17), ({"pool": "avg"}, 16)],
)
def test_ablation_variants(overrides, num_tokens):
    model = build_vit("vit_small", **TINY_VIT, **overrides)
    assert model.cfg.num_tokens == num_tokens
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, num_tokens, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    if overrides.get("pos_embed") == "learned":
        assert model.pos_embed.requires_grad
    if overrides.get("pos_embed") == "none":
        assert model.pos_embed is None
    if overrides.get("pool") == "avg":
        assert model.cls_token is None and isinstance(model.norm, nn.Identity)


def test_conv_stem_drops_one_block_and_trains():
    model = build_vit("vit_small", img_size=32, conv_stem=True, embed_dim=32, num_heads=4)
    assert model.cfg.depth == 11 and not model.cfg.random_patch_proj
    assert all(p.requires_grad for p in model.patch_embed.parameters())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_wrong_input_size_is_a_clear_error():
    model = build_vit("vit_small", **TINY_VIT)
    with pytest.raises(ValueError, match="img_size=32"):
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("overrides", [{}, {"pool": "avg"}, {"pos_embed": "learned"}, {"pos_embed": "none"}])
def test_same_features_as_timm_both_ways(overrides):
    ours = build_vit("vit_small", **TINY_VIT, **overrides).eval()
    theirs = build_timm_vit(ours.cfg).eval()
    theirs.load_state_dict(export_timm_state_dict(ours), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), ours.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    # ... and timm weights into ours.
    fresh_timm = build_timm_vit(ours.cfg).eval()
    fresh_ours = build_vit("vit_small", **TINY_VIT, **overrides).eval()
    load_backbone(fresh_ours, fresh_timm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh_ours(x), fresh_timm(x), rtol=1e-5, atol=1e-5)
