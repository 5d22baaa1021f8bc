"""CUDA-only checks of the model layer. Skipped without CUDA; run with `pytest -m gpu tests/gpu`."""

import pytest
import torch

from scale.models import build_moco, build_vit
from scale.models.flops import vit_macs
from scale.parallel.sync_batchnorm import CrossRankBatchNorm
from tests.helpers import TINY_HEADS, TINY_VIT, run_ranks

pytestmark = pytest.mark.gpu


class _ChannelsLastSyncBatchNorm(torch.nn.SyncBatchNorm):
    """torch's SyncBatchNorm for (B, ..., C) inputs (ViT-BN tokens), the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(-1, 1)).movedim(1, -1)


def _syncbn_agree(rank: int, world: int, channels_last: bool, dtype: torch.dtype) -> None:
    # gloo with CUDA tensors: two ranks can share one GPU (NCCL refuses that); torch's SyncBatchNorm
    # gathers with all_gather on gloo.
    torch.manual_seed(0)
    shape = (world * 4, 9, 16) if channels_last else (world * 4, 16)
    x = (torch.randn(*shape, device="cuda") * 3 + 1).to(dtype)
    mine = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
    theirs_in = mine.detach().clone().requires_grad_(True)
    ours = CrossRankBatchNorm(16, channels_last=channels_last).cuda()
    torch_cls = _ChannelsLastSyncBatchNorm if channels_last else torch.nn.SyncBatchNorm
    theirs = torch_cls(16).cuda()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for _ in range(3):  # running statistics over several batches
        y_ours, y_theirs = ours(mine), theirs(theirs_in)
    assert y_ours.dtype == y_theirs.dtype == dtype
    torch.testing.assert_close(y_ours, y_theirs, **tol)
    w = torch.randn_like(y_ours)
    (y_ours.float() * w.float()).sum().backward()
    (y_theirs.float() * w.float()).sum().backward()
    torch.testing.assert_close(mine.grad, theirs_in.grad, **tol)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-4, atol=1e-4)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    ours.eval(), theirs.eval()  # eval mode: the running statistics, no communication
    with torch.no_grad():
        fresh = (torch.randn(*shape, device="cuda") * 2).to(dtype)[:4]
        torch.testing.assert_close(ours(fresh), theirs(fresh), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cross_rank_batchnorm_agrees_with_torch_syncbn_on_cuda(channels_last, dtype):
    run_ranks(_syncbn_agree, 2, channels_last, dtype)


def test_bf16_autocast_loss_close_to_fp32_on_cuda():
    torch.manual_seed(0)
    model = build_moco("vit_small", **TINY_HEADS, **TINY_VIT).cuda()
    x1, x2 = torch.randn(8, 3, 32, 32, device="cuda"), torch.randn(8, 3, 32, 32, device="cuda")
    fp32 = model(x1, x2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(x1, x2)
    assert bf16.dtype == torch.float32  # the loss runs in fp32 under autocast
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-2)


def test_flop_counter_sees_fused_attention_on_cuda():
    from torch.utils.flop_counter import FlopCounterMode

    model = build_vit("vit_base").cuda().eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 224, 224, device="cuda"))
    assert fc.get_total_flops() // 2 == vit_macs(model.cfg).total


def _syncbn2d_agree(rank: int, world: int) -> None:
    """A convolution's BatchNorm2d (a ResNet's): ours keeps bf16 maps bf16 under autocast, as torch's
    SyncBatchNorm (cuDNN) does, and agrees with it in values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(world * 4, 8, 6, 6, device="cuda") * 3 + 1
    mine = x[rank * 4 : (rank + 1) * 4].clone().to(memory_format=torch.channels_last).requires_grad_(True)
    theirs_in = mine.detach().clone().requires_grad_(True)
    ours = CrossRankBatchNorm(8, keep_input_dtype=True).cuda()
    theirs = torch.nn.SyncBatchNorm(8).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ours, y_theirs = ours(mine.bfloat16()), theirs(theirs_in.bfloat16())
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), rtol=2e-2, atol=2e-2)
    w = torch.randn_like(y_ours.float())
    (y_ours.float() * w).sum().backward()
    (y_theirs.float() * w).sum().backward()
    torch.testing.assert_close(mine.grad, theirs_in.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-3, atol=1e-3)


def test_cross_rank_batchnorm2d_keeps_bf16_maps_and_agrees_with_torch_syncbn_on_cuda():
    run_ranks(_syncbn2d_agree, 2)


def test_resnet50_channels_last_and_bf16_on_cuda():
    """ResNet-50 MoCo: channels-last (what the layout sets on CUDA) computes what channels-first does
    (fp32, TF32 off), and the bf16 autocast loss is within 2% of fp32's."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = build_moco("resnet50", temperature=1.0, **TINY_HEADS).cuda()
    twin = build_moco("resnet50", temperature=1.0, **TINY_HEADS).cuda()
    twin.load_state_dict(model.state_dict())
    for enc in (twin.base_encoder, twin.momentum_encoder):
        enc.to_channels_last()
    assert twin.base_encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x1, x2 = torch.randn(8, 3, 64, 64, device="cuda"), torch.randn(8, 3, 64, 64, device="cuda")
    ref, cl = model(x1, x2), twin(x1, x2)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = twin(x1, x2)
    assert abs(low.item() - ref.item()) < 0.02 * abs(ref.item())
