"""Values derived from the config and the launch, each computed in one place: the batch split, the
learning rate and the step counts (`derive`, logged at start), and the run directory's default name.
"""

from __future__ import annotations

from dataclasses import dataclass

from scale.config.schema import Config, check_fields
from scale.errors import ConfigError
from scale.parallel.registry import run_name_suffix


def split_batch(cfg: Config, world_size: int) -> int:
    """The per-device batch of `cfg` on `world_size` ranks: `batch.batch_size_per_device`, or the
    global batch divided by world size x accumulation steps.

    Raises:
        ConfigError: the global batch does not split into world size x per-device batch x
            accumulation steps.
    """
    b = cfg.batch
    per_device = b.batch_size_per_device or b.global_batch_size // max(1, world_size * b.grad_accum_steps)
    if per_device < 1 or per_device * world_size * b.grad_accum_steps != b.global_batch_size:
        raise ConfigError(
            f"--batch.global_batch_size={b.global_batch_size} does not split into {world_size} rank(s) x "
            f"{b.batch_size_per_device or per_device} per device x {b.grad_accum_steps} accumulation steps; "
            "change --batch.global_batch_size, --batch.batch_size_per_device or --batch.grad_accum_steps"
        )
    return per_device


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the launch, in one place (logged at start)."""

    world_size: int
    batch_size_per_device: int
    grad_accum_steps: int
    global_batch_size: int
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    negatives_per_loss: int
    """Keys each query is contrasted with: the global batch, or with `batch.keys=micro` and
    accumulation, micro-batch x world size."""

    def summary(self) -> str:
        return (
            f"world size {self.world_size} x batch per device {self.batch_size_per_device} x grad accumulation "
            f"{self.grad_accum_steps} = global batch {self.global_batch_size}; lr {self.lr:.3g}; "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, {self.warmup_steps} warmup steps"
            + (f"; {self.negatives_per_loss} keys per loss" if self.negatives_per_loss else "")
        )


def derive(cfg: Config, world_size: int, num_samples: int) -> Derived:
    """Check that the batch splits and compute lr, per-device batch and step counts.

    Raises:
        ConfigError: a field breaks its rule, the global batch does not split (`split_batch`), or
            the data is smaller than one global batch.
    """
    check_fields(cfg)
    per_device = split_batch(cfg, world_size)
    b = cfg.batch
    steps_per_epoch = num_samples // b.global_batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the data has {num_samples} samples, fewer than one global batch of {b.global_batch_size}; "
            "lower --batch.global_batch_size"
        )
    s = cfg.schedule
    total = max(1, round(s.epochs * steps_per_epoch))
    return Derived(
        world_size=world_size,
        batch_size_per_device=per_device,
        grad_accum_steps=b.grad_accum_steps,
        global_batch_size=b.global_batch_size,
        lr=cfg.optim.base_lr * b.global_batch_size / 256,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(s.warmup_epochs * steps_per_epoch),
        negatives_per_loss=0
        if cfg.task != "pretrain"  # no contrastive loss
        else per_device * world_size * (b.grad_accum_steps if b.keys == "global" else 1),
    )


def default_run_name(cfg: Config) -> str:
    """`cfg.run.name`, or when it is '' the recipe's name (`run` without one) and, for the sharded
    backends, a suffix: `-fsdp`, or the DeepSpeed config's name (`-zero3`)."""
    if cfg.run.name:
        return cfg.run.name
    p = cfg.parallel
    return (cfg.recipe or "run") + run_name_suffix(p.backend, p.deepspeed_config)
