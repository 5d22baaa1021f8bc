import torch
from torch import nn

from scale.models import build_moco
from scale.models.vit import TokenBatchNorm
from scale.parallel.sync_batchnorm import CrossRankBatchNorm, convert_sync_batchnorm
from tests.helpers import TINY_HEADS, TINY_VIT


def test_converter_replaces_every_batchnorm_and_keeps_state():
    model = build_moco("vit_small", use_bn=True, **TINY_HEADS, **TINY_VIT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_()
                if m.affine:
                    m.weight.uniform_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    token_bn = {n for n, m in model.named_modules() if isinstance(m, TokenBatchNorm)}
    model.momentum_encoder.eval()
    converted = convert_sync_batchnorm(model)
    assert converted is model
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert bns and all(isinstance(m, CrossRankBatchNorm) for m in bns.values())
    assert {n for n, m in bns.items() if m.channels_last} == token_bn
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in model.momentum_encoder.modules())
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())


def test_cross_rank_batchnorm_is_plain_batchnorm_in_one_process():
    x = torch.randn(6, 5, 7) * 2 + 3  # (B, N, D) tokens, channels last
    plain = TokenBatchNorm(7)
    ours = CrossRankBatchNorm(7, channels_last=True)
    torch.testing.assert_close(ours(x), plain(x))
    torch.testing.assert_close(ours.running_var, plain.running_var)
    ours.eval(), plain.eval()
    torch.testing.assert_close(ours(x), plain(x))
