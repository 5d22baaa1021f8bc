"""2 real gloo processes, each with half the batch, against one process with the whole batch."""

import copy

import pytest
import torch
import torch.distributed as dist

from scale.models import build_moco
from scale.parallel.dist import AllGatherKeys
from scale.parallel.sync_batchnorm import CrossRankBatchNorm, convert_sync_batchnorm
from tests.helpers import TINY_HEADS, TINY_VIT, run_ranks

pytestmark = pytest.mark.distributed

LOCAL_BATCH = 4
# The two runs differ only in reduction order (sums split across ranks). In float64 that leaves
# ~1e-15, so elements must agree to 1e-10: the mathematics is the same. In float32 single elements
# that are sums of many cancelling terms (the class token's gradient) move by more, so gradients
# are compared per parameter tensor: L2 error under 1e-5 of the tensor's gradient norm plus 1e-7 of
# the global one (for tensors whose true gradient is ~0: the final norm's bias feeds a BatchNorm
# that removes any shift).
FP64_TOL = dict(rtol=1e-10, atol=1e-12)
FP32_REL_L2 = 1e-5


def _assert_grad_close(name: str, grad: torch.Tensor, ref: torch.Tensor, global_norm: float) -> None:
    if grad.dtype == torch.float64:
        torch.testing.assert_close(grad, ref, **FP64_TOL, msg=lambda m: f"{name}: {m}")
        return
    err, bound = (grad - ref).norm().item(), FP32_REL_L2 * ref.norm().item() + 1e-7 * global_norm
    assert err < bound, f"{name}: L2 error {err:.2e} over the bound {bound:.2e}"


def _equivalence(rank: int, world: int, use_bn: bool, dtype: torch.dtype) -> None:
    torch.set_default_dtype(dtype)
    tol = FP64_TOL if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    reference = build_moco("vit_small", use_bn=use_bn, **TINY_HEADS, **TINY_VIT)
    model = convert_sync_batchnorm(copy.deepcopy(reference))
    assert any(isinstance(m, CrossRankBatchNorm) for m in model.modules())
    model.key_gather = AllGatherKeys()

    g = torch.Generator().manual_seed(1)  # the same global batch on every rank
    x1 = torch.randn(world * LOCAL_BATCH, 3, 32, 32, generator=g)
    x2 = torch.randn(world * LOCAL_BATCH, 3, 32, 32, generator=g)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)

    with torch.no_grad():  # let the momentum update do something
        for p in reference.base_encoder.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.load_state_dict(reference.state_dict())

    ref_loss = reference(x1, x2, momentum=0.9)
    ref_loss.backward()
    loss = model(x1[mine], x2[mine], momentum=0.9)
    loss.backward()

    # What DDP does: the objective is the mean of the ranks' losses, gradients are averaged.
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / world, ref_loss.detach(), **tol)
    assert not torch.allclose(loss.detach(), ref_loss.detach())  # each rank alone differs

    ref_params = dict(reference.named_parameters())
    global_norm = torch.cat([p.grad.flatten() for p in ref_params.values() if p.grad is not None]).norm().item()
    checked = 0
    for name, p in model.named_parameters():
        ref = ref_params[name]
        if ref.grad is None:
            assert p.grad is None, name
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)
        _assert_grad_close(name, grad / world, ref.grad, global_norm)
        checked += 1
    assert checked > 20
    # BatchNorm running statistics see the global batch, in both encoders.
    ref_buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("use_bn", [False, True], ids=["vit", "vit_bn"])
def test_two_ranks_half_batch_equal_one_rank_whole_batch(use_bn, dtype):
    run_ranks(_equivalence, 2, use_bn, dtype)


def _gather_order(rank: int, world: int) -> None:
    gather = AllGatherKeys()
    assert gather.rank == rank
    keys = torch.full((3, 2), float(rank))
    out = gather(keys)
    assert out.shape == (3 * world, 2)
    for r in range(world):
        assert torch.equal(out[3 * r : 3 * (r + 1)], torch.full((3, 2), float(r)))


def test_key_gather_is_in_rank_order():
    run_ranks(_gather_order, 2)
