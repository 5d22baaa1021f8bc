"""`--model.compile`: regional compilation of the blocks and heads equals eager, composes with
activation checkpointing, and traces one graph for all blocks."""

import pytest
import torch

from scale.train.trainer import Trainer
from tests.helpers import FixedBatchLoader, read_metrics, tiny_config


def _run(tmp_path, name, compiled, recompute=True):
    overrides = {"model.compile": compiled, "parallel.activation_checkpointing": recompute, "schedule.max_steps": 3,
                 "optim.base_lr": 0.05, "schedule.warmup_epochs": 0}  # fmt: skip
    trainer = Trainer(tiny_config(tmp_path, name, **overrides), loader=FixedBatchLoader(4, 8))
    b = trainer.backend
    x1, x2, _ = next(iter(FixedBatchLoader(1, 8, seed=7)))
    b.forward_backward(x1, x2)
    grads = {n: p.grad.clone() for n, p in b.module.named_parameters() if p.grad is not None}
    b.optimizer.zero_grad(set_to_none=True)
    trainer.fit()
    return [r["loss"] for r in read_metrics(trainer.run_dir)], grads, trainer.backend.full_state_dict()


@pytest.mark.parametrize("recompute", ["true", "selective"])
def test_compiled_blocks_and_heads_train_as_eager(tmp_path, recompute):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_grads, eager_state = _run(tmp_path, "eager", False, recompute)
    losses, grads, state = _run(tmp_path, "compiled", True, recompute)
    # Inductor fuses and reorders float32 arithmetic: equal within its rounding. The gradients of one
    # step, relative to the largest (a few are exactly 0 in exact arithmetic, such as the key bias,
    # to which softmax is blind: there both are rounding noise), and the losses of 3 AdamW steps.
    top = max(float(g.abs().max()) for g in eager_grads.values())
    assert set(grads) == set(eager_grads)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * top, msg=name)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert set(state) == set(eager_state)  # compiled in place: the same parameter names
    # One graph for every block of an encoder (the same code; parameters are inputs), whatever the
    # depth: the base encoder's blocks (with grad), the momentum encoder's (no grad), and the three
    # heads. A graph per block would be 2 x depth + 3.
    assert counters["stats"]["unique_graphs"] == 5


def test_compile_without_a_cpp_compiler_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    import shutil

    from scale.config import ConfigError
    from scale.preflight import preflight

    cfg = tiny_config(tmp_path, "nocxx", **{"model.compile": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C[+][+] compiler"):
        preflight(cfg, world_size=1, data=False)
