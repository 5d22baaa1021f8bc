"""The trainer: builds data, model and backend from a `Config` and runs MoCo v3 pretraining.

Per optimizer step: lr / weight decay / momentum from their schedules (pure functions of the step),
`grad_accum_steps` micro-batches forward + backward, one optimizer step, then the momentum update
with the next step's coefficient (the authors update at the start of each iteration, i.e. after the
previous step: the same order). A step whose gradients are not finite (e.g. a NaN loss) is skipped:
no optimizer step, no momentum update, BatchNorm statistics restored. The decision is the same on
every rank because it is taken on the all-reduced gradient norm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from scale.config import Config, ConfigError, Derived, default_run_name, derive
from scale.data.augment import AugmentConfig
from scale.data.loader import DataError, build_loader
from scale.models import MoCoV3, build_moco
from scale.models.flops import moco_training_flops
from scale.models.vit import attention_backend
from scale.optim import build_optimizer, lr_at, momentum_at, param_groups, weight_decay_at
from scale.parallel.base import ShardingPlan, configure_tf32
from scale.parallel.checkpointing import apply_activation_checkpointing
from scale.parallel.compile import compile_regions
from scale.parallel.cpu import tune_cpu_malloc
from scale.parallel.dist import AllGatherKeys
from scale.parallel.launch import build_backend, init_distributed
from scale.parallel.sync_batchnorm import convert_sync_batchnorm
from scale.train.checkpoint import clean_leftovers, find_resume, list_checkpoints, load_checkpoint, save_checkpoint
from scale.train.faults import CheckpointWriteError, StalledRankError, TrainingError, fault_point
from scale.train.memory import check_memory
from scale.train.metrics import MetricsLogger, Progress, device_peak, peak_memory_gib
from scale.train.monitors import RunMonitors
from scale.train.preemption import Preempted, PreemptionWatch, requeue_slurm_job, restart_count, watch_signal
from scale.train.watchdog import Heartbeat, is_collective_failure

log = logging.getLogger(__name__)

# Fields that may differ between a run directory's config and a resumed run's.
RESUMABLE_CHANGES = {
    "run.resume", "run.progress", "run.tensorboard", "run.log_every", "run.keep_last", "run.ckpt_every",
    "run.knn_every_epochs", "schedule.max_steps", "data.num_workers", "parallel.activation_checkpointing",
    "run.preempt_signal", "run.preempt_check_every", "run.requeue", "run.max_requeues", "run.ckpt_failure",
    "run.max_ckpt_failures", "data.max_lost_fraction", "parallel.timeout_minutes", "model.view_forward",
    "model.compile", "parallel.tune_cpu_malloc",
}  # fmt: skip


def build_model(cfg: Config) -> MoCoV3:
    m = cfg.model
    return build_moco(m.name, dim=m.dim, mlp_dim=m.mlp_dim, temperature=m.temperature, view_forward=m.view_forward,
                      **m.vit_overrides())  # fmt: skip


def sharding_plan(model: MoCoV3) -> ShardingPlan:
    """Shard every transformer block of both encoders, then the encoders and the predictor; the
    momentum encoder gets exactly the base encoder's layout (its EMA then runs on local shards)."""
    enc, mom = model.base_encoder, model.momentum_encoder
    return ShardingPlan(
        units=[*enc.blocks, *mom.blocks, enc, mom, model.predictor],
        forward_methods=[(enc, "pooled_features"), (mom, "pooled_features")],
    )


def compiled_regions(model: MoCoV3) -> list[torch.nn.Module]:
    """What `--model.compile` compiles: each transformer block of both encoders (one graph for all:
    the same code), both projectors and the predictor."""
    enc, mom = model.base_encoder, model.momentum_encoder
    return [*enc.blocks, *mom.blocks, enc.head, mom.head, model.predictor]


def split_batch(cfg: Config, world_size: int) -> int:
    """Per-device batch; the full check (with the data size) is `scale.config.derive`."""
    b = cfg.batch
    per_device = b.batch_size_per_device or b.global_batch_size // max(1, world_size * b.grad_accum_steps)
    if per_device < 1 or per_device * world_size * b.grad_accum_steps != b.global_batch_size:
        derive(cfg, world_size, 1 << 62)  # raises the full message
    return per_device


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse a run directory that holds a different config (nothing written before is lost)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    old, new = _flatten(json.loads(path.read_text())), _flatten(json.loads(cfg.to_json()))
    # A field added to scale after the run started is absent from its config: its default is the
    # behaviour the run had.
    defaults = _flatten(json.loads(Config().to_json()))
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
                  and not k.startswith("monitor."))  # fmt: skip
    if diff:
        changes = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
        raise ConfigError(
            f"run directory {run_dir} holds a different config ({changes}); use another --run.name or "
            "--run.output_dir, or delete the directory to start over"
        )


class Trainer:
    """Build everything from `cfg` (or take a prepared `loader` / `backend`) and `fit()`."""

    def __init__(self, cfg: Config, loader=None, backend=None):
        self.cfg = cfg
        # First of all: a preemption signal during the start-up (minutes for ViT-H) is recorded, not
        # fatal (SIGUSR2's default action ends the process); acted on at the first check.
        self.preempt = watch_signal(cfg.run.preempt_signal, cfg.run.preempt_check_every)
        init_distributed(cfg.parallel.dist_backend, cfg.parallel.timeout_minutes)
        self.backend = b = backend or build_backend(
            cfg.parallel.backend, cfg.parallel.precision, cfg.parallel.deepspeed_config
        )
        configure_tf32(cfg.parallel.tf32, b.device)
        if b.device.type == "cpu" and cfg.parallel.tune_cpu_malloc:
            tune_cpu_malloc()  # before the model and the activations are allocated
        per_device = split_batch(cfg, b.world_size)
        if not cfg.parallel.skip_memory_check:
            check_memory(cfg, b, per_device)  # before building anything large
        cfg.run.name = default_run_name(cfg)  # resolved once: config.json records the directory's name
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        check_run_dir(self.run_dir, cfg)  # on every rank, before any work
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank

        self.loader = loader or build_loader(
            cfg.data.source,
            batch_size=per_device,
            world_size=b.world_size,
            rank=b.rank,
            augment=AugmentConfig(crop_size=cfg.model.img_size, crop_scale=(cfg.data.crop_min, 1.0)),
            backend=cfg.data.backend,
            num_workers=cfg.data.num_workers,
            seed=cfg.run.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            resampled=cfg.data.resampled,
            pin_memory=b.device.type == "cuda",
            device=b.device if b.device.type == "cuda" else None,
            device_id=b.device.index if b.device.type == "cuda" else None,
        )
        self.derived: Derived = derive(cfg, b.world_size, len(self.loader) * per_device * b.world_size)

        model = build_model(cfg)
        self.vit_cfg = model.base_encoder.cfg
        if b.world_size > 1:
            convert_sync_batchnorm(model)
            model.key_gather = AllGatherKeys()
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model.base_encoder.blocks)
        if cfg.model.compile:  # after checkpointing, before the backend shards or wraps the model
            regions = compile_regions(compiled_regions(model))
            if b.is_main:
                log.info("torch.compile: %d regions (every transformer block of both encoders, the two projectors "
                         "and the predictor), one graph per kind, compiled at the first step", regions)  # fmt: skip
        self.optimizer_description = ""

        def optimizer_factory(module):
            o = cfg.optim
            groups = param_groups(module, o.exclude_norm_bias_from_wd)
            opt, self.optimizer_description = build_optimizer(
                o.name, groups, self.derived.lr, o.weight_decay, o.betas, o.eps, o.momentum, o.trust_coefficient,
                o.implementation,
            )  # fmt: skip
            return opt

        b.setup(model, optimizer_factory, cfg, self.derived, sharding_plan(model))
        num_samples = len(self.loader) * per_device * b.world_size
        self.monitors = RunMonitors(cfg.monitor, b, b.module, num_samples, self.derived.global_batch_size,
                                    per_device * self.derived.grad_accum_steps)  # fmt: skip
        self.metrics: MetricsLogger | None = None
        self.flops_per_image = moco_training_flops(self.vit_cfg, cfg.model.dim, cfg.model.mlp_dim).total
        self.peak_flops, self.peak_label = device_peak(b.device, b.compute_precision)
        self.step = 0
        self.skips = SkipCounter(b.device)
        self.last_saved_step: int | None = None
        self.ckpt_failures = 0  # checkpoint writes failed in a row
        self.heartbeat = Heartbeat(b.rank, b.world_size, cfg.parallel.timeout_minutes * 60)
        b.barrier()  # every rank has checked the run directory before rank 0 writes into it

    # ------------------------------------------------------------------ helpers

    def _log_start(self) -> None:
        b, cfg, d = self.backend, self.cfg, self.derived
        if not b.is_main:
            return
        if restart_count():
            log.info("SLURM restart %d of job %s (requeued), resuming in %s", restart_count(),
                     os.environ.get("SLURM_JOB_ID"), self.run_dir)  # fmt: skip
        trainable = b.num_params(b.module, trainable_only=True)
        log.info("recipe %s, run directory %s", cfg.recipe or "(none)", self.run_dir)
        log.info(
            "model %s: backbone %.1f M params, %d trainable in all; %.1f GFLOPs per training image",
            cfg.model.name,
            b.num_params(b.module.base_encoder) / 1e6,
            trainable,
            self.flops_per_image / 1e9,
        )
        log.info("backend: %s; optimizer: %s", b.describe(), self.optimizer_description)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(b.precision, torch.float32)
        log.info("attention: scaled_dot_product_attention with the %s kernel (%s, %d tokens, head width %d); "
                 "both views through each encoder %s", attention_backend(self.vit_cfg, b.device, dtype), b.precision,
                 self.vit_cfg.num_tokens, self.vit_cfg.embed_dim // self.vit_cfg.num_heads,
                 "as one batch (joint views)" if b.module.joint_views
                 else "one view at a time (BatchNorm before the head needs per-view statistics)")  # fmt: skip
        log.info("derived: %s", d.summary())
        if d.grad_accum_steps > 1:
            log.info(
                "gradient accumulation: each loss contrasts %d keys (micro-batch x world size), not the global batch",
                d.negatives_per_loss,
            )
        log.info("MFU against the %s (%.1f TFLOP/s)", self.peak_label, self.peak_flops / 1e12)
        log.info("%s", self.monitors.describe())

    def _client_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data": self.loader.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.skips.in_row,
            "scaler_skips": self.scaler_skips,
            "monitors": self.monitors.state_dict(),
            "config": self.cfg.to_dict(),
            "derived": dataclasses.asdict(self.derived),
        }

    @property
    def nonfinite_total(self) -> int:
        """Non-finite (skipped) steps so far, as of the last log row or checkpoint."""
        return self.skips.nonfinite_total

    @property
    def scaler_skips(self) -> int:
        """fp16 loss-scale overflows (skipped steps) so far, as of the last log row or checkpoint."""
        return self.skips.overflow_total

    def save(self, final: bool = False) -> Path | None:
        """A checkpoint of this step. A write that fails follows `run.ckpt_failure`: 'retry' logs it
        and returns None (training goes on; the next interval writes again) unless this is the
        final or preemption checkpoint or `run.max_ckpt_failures` failed in a row; else it raises."""
        self._read_skips(self.skips.pending.tolist())  # the checkpoint records the counts
        self._read_monitors([])  # and the monitors' state
        r = self.cfg.run
        try:
            path = save_checkpoint(self.backend, self.run_dir, self.step, self._client_state(), r.keep_last)
        except CheckpointWriteError as e:
            self.ckpt_failures += 1
            ckpts = list_checkpoints(self.run_dir)
            last = f"the last complete checkpoint is {ckpts[-1].name}" if ckpts else "no checkpoint is complete yet"
            if r.ckpt_failure == "stop" or final or self.ckpt_failures >= r.max_ckpt_failures:
                why = ("run.ckpt_failure=stop" if r.ckpt_failure == "stop" else "the final checkpoint" if final
                       else f"{self.ckpt_failures} failures in a row")  # fmt: skip
                raise CheckpointWriteError(f"{e}; stopping ({why}); {last}. Free space or fix the disk, then "
                                           "run the same command to resume") from None  # fmt: skip
            log.error("%s; %s; training goes on and writes again at the next interval (failure %d of %d "
                      "in a row allowed by run.max_ckpt_failures)", e, last, self.ckpt_failures,
                      r.max_ckpt_failures)  # fmt: skip
            return None
        self.ckpt_failures = 0
        self.last_saved_step = self.step
        return path

    def _prepare_run_dir(self) -> None:
        if self.backend.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / ".config.json.tmp"
            tmp.write_text(self.cfg.to_json())
            tmp.replace(self.run_dir / "config.json")
        self.backend.barrier()

    def _resume(self) -> None:
        if self.backend.is_main:  # what interrupted writes left; checkpoints that fail verification
            clean_leftovers(self.run_dir)
        # Rank 0 decides, so every rank resumes from the same checkpoint whatever its view of the disk.
        path = self.backend.broadcast_object(
            find_resume(self.run_dir, self.cfg.run.resume) if self.backend.is_main else None
        )
        start = 0
        if path is not None:
            client = load_checkpoint(self.backend, Path(path))
            self.step = start = int(client["step"])
            self.skips.restore(
                int(client.get("nonfinite_total", 0)), int(client.get("scaler_skips", 0)),
                int(client.get("nonfinite_in_row", 0)),
            )  # fmt: skip
            self.loader.load_state_dict(client["data"])
            self.monitors.load_state_dict(client.get("monitors"))
            self.last_saved_step = self.step
            log.info("resumed from %s at step %d", path, self.step)
        if self.backend.is_main:
            set_aside_newer(self.run_dir, start)
            for name in ("metrics.jsonl", "gradients.jsonl", "events.jsonl"):
                truncate_metrics(self.run_dir / name, start)
        self.backend.barrier()

    # ------------------------------------------------------------------ training

    def train_step(self, micro_batches: list) -> dict[str, Any]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns its metrics (loss and
        gradient norm as device tensors: nothing here waits for the device; a log row reads them).

        A step whose gradient norm is not finite is skipped on the device: the optimizer leaves the
        weights, the BatchNorm statistics are put back and the momentum encoder does not move (all
        masked by the same device flag). Under fp16 a skip with finite losses on every rank is a
        loss-scale overflow (expected); anything else counts as non-finite.
        """
        b, cfg, d = self.backend, self.cfg, self.derived
        lr = lr_at(self.step, d.lr, d.warmup_steps, d.total_steps)
        wd = weight_decay_at(self.step, cfg.optim.weight_decay, cfg.optim.final_weight_decay, d.total_steps)
        saved = b.snapshot_buffers()
        losses = [
            b.forward_backward(x1, x2, d.grad_accum_steps, last=i == len(micro_batches) - 1)
            for i, (x1, x2, _) in enumerate(micro_batches)
        ]
        result = b.step(lr, wd, cfg.optim.clip_grad, measure_groups=self.monitors.measure_grads(self.step + 1))
        loss = torch.stack(losses).double().mean()
        next_momentum = momentum_at(self.step + 1, d.total_steps, cfg.schedule.momentum, cfg.schedule.final_momentum)
        b.restore_buffers(saved, result.applied)
        b.momentum_update(next_momentum, result.applied)
        self.skips.add(self.step, result.applied, b.scaler_overflow(loss))
        self.step += 1
        self.monitors.after_step(self.step, micro_batches, result.group_norms)
        return {"loss": loss, "lr": lr, "weight_decay": wd, "momentum": next_momentum, "grad_norm": result.grad_norm}

    def _read_skips(self, values: list[float]) -> None:
        """Take the skip counts read from the device: log them, stop after too many in a row."""
        new_nonfinite, new_overflow, worst, last = self.skips.consume(values)
        if new_overflow:
            log.info("%d fp16 loss-scale overflow(s) skipped (%d so far)", new_overflow, self.skips.overflow_total)
        if not new_nonfinite:
            return
        log.warning(
            "%d non-finite step(s) skipped (the last at step %d; %d in a row now, %d in all)",
            new_nonfinite, last, self.skips.in_row, self.skips.nonfinite_total,
        )  # fmt: skip
        if worst >= self.cfg.run.max_nonfinite:
            ckpts = list_checkpoints(self.run_dir)
            raise TrainingError(
                f"{worst} non-finite steps in a row at step {last}; stopping. The last good "
                f"checkpoint is {ckpts[-1] if ckpts else '(none yet)'}; lower --optim.base_lr, set "
                "--optim.clip_grad, or check the data"
            )

    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule (or `schedule.max_steps`); returns the final metrics."""
        cfg, b, d = self.cfg, self.backend, self.derived
        self._prepare_run_dir()
        self._resume()
        self._log_start()
        stop = min(d.total_steps, cfg.schedule.max_steps) if cfg.schedule.max_steps else d.total_steps
        metrics = self.metrics = MetricsLogger(self.run_dir, b.is_main, cfg.run.tensorboard)
        progress = Progress(stop, self.step, b.is_main, cfg.run.progress)
        preempt = self.preempt
        preempt.any_rank = b.any_rank
        self.heartbeat.start()
        try:
            row = self._loop(stop, metrics, progress, preempt)
        except RuntimeError as e:
            if b.world_size > 1 and is_collective_failure(e):
                raise StalledRankError(self.heartbeat.diagnose(e)) from e
            raise
        finally:
            self.heartbeat.stop()
            progress.close()
            self.monitors.close()
            metrics.close()
            self.metrics = None
        return {"step": self.step, "nonfinite_total": self.nonfinite_total, **row}

    def _loop(self, stop: int, metrics, progress, preempt) -> dict[str, Any]:
        """The steps up to `stop`; returns the last log row."""
        cfg, d = self.cfg, self.derived
        window = _Window()
        row: dict[str, Any] = {}
        while self.step < stop:
            batches = iter(self.loader)
            micro: list = []
            t_data = time.perf_counter()
            for batch in batches:
                window.data += time.perf_counter() - t_data
                micro.append(batch)
                if len(micro) == d.grad_accum_steps:
                    step_metrics = self.train_step(micro)
                    self.heartbeat.step = self.step
                    fault_point("step", self.step)
                    micro = []
                    window.add(step_metrics["loss"])
                    if self.step % cfg.run.log_every == 0 or self.step == 1 or self.step == stop:
                        row = self._log_row(step_metrics, window)
                        metrics.log(self.step, row)
                        progress.line(self.step, f"loss {row['loss']:.4f} {row['img_per_s']:.0f} img/s")
                        progress.update(self.step, {"loss": f"{row['loss']:.4f}", "img/s": f"{row['img_per_s']:.0f}"})
                        window = _Window()
                    else:
                        progress.update(self.step, {})
                    if cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0:
                        self.save()
                        window.restart()
                    if self.step >= stop:
                        break
                    if preempt.due(self.step):
                        batches.close()  # release the workers
                        self._stop_for_preemption(preempt)
                t_data = time.perf_counter()
            else:  # the epoch is complete
                epoch = self.step // d.steps_per_epoch  # epochs completed
                if not cfg.run.ckpt_every and self.step < stop:
                    self.save()
                if cfg.run.knn_every_epochs and epoch % cfg.run.knn_every_epochs == 0 and self.step < stop:
                    row["knn_top1"] = self.knn_monitor()
                    metrics.log(self.step, {"knn_top1": row["knn_top1"]})
                window.restart()
                continue
            batches.close()  # stopped mid-epoch: release the workers
        if self.last_saved_step != self.step:
            self.save(final=True)
        return row

    def _stop_for_preemption(self, preempt: PreemptionWatch) -> None:
        """Every rank: a complete checkpoint of this step, then (rank 0, under SLURM) the requeue,
        then `Preempted`. See `scale.train.preemption`."""
        b, cfg = self.backend, self.cfg
        when = f"{time.time() - preempt.received:.0f} s ago" if preempt.received is not None else "on another rank"
        preempt.received = None  # acted on (a later fit in this process starts afresh)
        if b.is_main:
            log.warning("%s received %s: stopping at step %d after a checkpoint", preempt.name, when, self.step)
        if self.last_saved_step != self.step:
            self.save(final=True)
        b.barrier()  # every rank's part of the checkpoint is written before the job can end
        requeued, why = False, "run.requeue=false: run the same command again to resume"
        if b.is_main and cfg.run.requeue:
            requeued, why = requeue_slurm_job(cfg.run.max_requeues)
        requeued, why = b.broadcast_object((requeued, why))
        if b.is_main:
            (log.warning if requeued else log.error)("preempted at step %d: %s", self.step, why)
        raise Preempted(self.step, requeued, f"stopped at step {self.step} on {preempt.name}: {why}")

    def _log_row(self, step_metrics: dict[str, Any], window: _Window) -> dict[str, Any]:
        """The metrics row: the one host sync of a step, and only of a logged one (the window's loss
        all-reduced on the device, then loss, gradient norm and skip counts read in one copy)."""
        b, d = self.backend, self.derived
        mean = window.mean_loss().reshape(1).double()
        # The samples lost and read on this rank ride along the loss's all-reduce (a copy to the
        # device, no read): summed over the ranks for the lost-data check.
        data = torch.tensor([getattr(self.loader, "num_skipped", 0), getattr(self.loader, "num_read", 0)],
                            dtype=torch.float64).to(mean.device)  # fmt: skip
        reduced = b.all_reduce_mean_tensor(torch.cat([mean, data]))  # means over the window and the ranks
        loss, data = reduced[:1], reduced[1:] * b.world_size
        monitor_tensors, layout = self.monitors.pending()
        packed = torch.cat([loss, step_metrics["grad_norm"].reshape(1).double().to(loss.device),
                            self.skips.pending.double().to(loss.device), data,
                            *(t.to(loss.device) for t in monitor_tensors)])  # fmt: skip
        values = packed.tolist()
        self._read_skips(values[2:7])
        self._read_monitors(values[9:], layout)
        self._check_data_loss(round(values[7]), round(values[8]))
        elapsed = time.perf_counter() - window.start
        img_per_s = window.steps * d.global_batch_size / max(elapsed, 1e-9)
        flops_per_device = img_per_s * self.flops_per_image / b.world_size
        return {
            **step_metrics,
            "loss": values[0],
            "grad_norm": values[1] if math.isfinite(values[1]) else float("nan"),
            "epoch": self.step / d.steps_per_epoch,
            "img_per_s": img_per_s,
            "img_per_s_per_device": img_per_s / b.world_size,
            "tflops_per_device": flops_per_device / 1e12,
            "mfu": flops_per_device / self.peak_flops if math.isfinite(self.peak_flops) else float("nan"),
            "data_time_frac": window.data / max(elapsed, 1e-9),
            "step_time_s": elapsed / max(window.steps, 1),
            "peak_mem_gib": peak_memory_gib(b.device),
            "nonfinite_total": self.nonfinite_total,
            "scaler_skips": self.scaler_skips,
            **self.monitors.summary(),
            **self.loader.metrics(),
        }

    def _check_data_loss(self, lost: int, read: int) -> None:
        """Stop (every rank at once: the counts are summed over the ranks) when the samples lost so
        far (corrupt images, unreadable or vanished shards: each skipped, counted and logged) exceed
        `data.max_lost_fraction` of the samples read."""
        limit = self.cfg.data.max_lost_fraction
        if read and lost / read > limit:
            ckpts = list_checkpoints(self.run_dir)
            raise DataError(
                f"{lost} of the {read} samples read so far were lost ({lost / read:.2%}, more than "
                f"--data.max_lost_fraction={limit:g}): corrupt or undecodable images or unreadable shards, named "
                f"in the warnings above; fix or re-shard the data (or raise the fraction) and run the same command to "
                f"resume from {ckpts[-1].name if ckpts else 'the start'}"
            )

    def _read_monitors(self, values: list[float], layout=None) -> None:
        """Hand the monitors their values (read with the log row; without `layout`, read them here:
        before a checkpoint) and write their rows: dense kNN rows go to metrics.jsonl."""
        if layout is None:
            tensors, layout = self.monitors.pending()
            values = torch.cat(tensors).tolist() if tensors else []
        rows = self.monitors.consume(
            values, layout, self.run_dir, write=self.backend.is_main and self.metrics is not None
        )
        if self.metrics is not None:
            for step, row in rows:
                self.metrics.log(step, row)

    # ------------------------------------------------------------------ evaluation

    def knn_monitor(self, backbone=None) -> float:
        """kNN top-1 (%) of `backbone` (default: the base encoder's) on the configured held-out data.

        Every rank extracts the features of its share (sharded models need every rank's forward)
        and keeps them: the kNN is sharded (`scale.train.knn`), no rank gathers the bank. NaN when
        no kNN data is configured.
        """
        from scale.train.knn import extract_features, knn_classify

        cfg, b = self.cfg, self.backend
        if not (cfg.data.eval_source and cfg.data.knn_train_source):
            return float("nan")
        kwargs = dict(crop_size=cfg.model.img_size, device=b.device, autocast_dtype=b.autocast_dtype,
                      rank=b.rank, world_size=b.world_size)  # fmt: skip
        sources = (cfg.data.knn_train_source, cfg.data.eval_source)
        if backbone is None:  # the trained base encoder, as the backend runs it
            backbone = b.eval_model().base_encoder
            with b.evaluation(backbone) as features:
                parts = [extract_features(backbone, s, features_fn=features, **kwargs) for s in sources]
        else:
            parts = [extract_features(backbone, s, **kwargs) for s in sources]
        comm = b.comm_device()
        (train_f, train_y), (test_f, test_y) = ((f.to(comm), y.to(comm)) for f, y in parts)
        k = cfg.run.knn_k
        return knn_classify(test_f, test_y, train_f, train_y, ks=(k,), temperature=cfg.run.knn_temperature)[k]

    def knn_random_init(self) -> float:
        """The kNN monitor on the same backbone at its initial (random) weights."""
        torch.manual_seed(self.cfg.run.seed)
        fresh = build_model(self.cfg).base_encoder.to(self.backend.device)
        return self.knn_monitor(fresh)


class SkipCounter:
    """Skipped steps, counted on the device and read on the host only with a log row or checkpoint.

    `pending` holds, since the last read: non-finite steps, fp16 overflows, the current run of
    non-finite steps in a row (carried over reads), the longest run, the last non-finite step + 1.
    """

    def __init__(self, device: torch.device):
        self.pending = torch.zeros(5, dtype=torch.int64, device=device)
        self.nonfinite_total = self.overflow_total = self.in_row = 0

    def add(self, step: int, applied: torch.Tensor | bool, overflow: torch.Tensor | None) -> None:
        p = self.pending
        if isinstance(applied, bool):  # a fill kernel, not a copy from host memory
            applied = torch.full((), applied, dtype=torch.bool, device=p.device)
        skipped = ~applied.to(p.device)
        if overflow is None:
            overflow = torch.zeros((), dtype=torch.bool, device=p.device)
        overflow = overflow.to(p.device)
        nonfinite = (skipped & ~overflow).long()
        run = (p[2] + 1) * nonfinite  # 0 again after a good step
        self.pending = torch.stack(
            [p[0] + nonfinite, p[1] + (skipped & overflow).long(), run, torch.maximum(p[3], run),
             torch.where(nonfinite.bool(), step + 1, p[4])]
        )  # fmt: skip

    def restore(self, nonfinite_total: int, overflow_total: int, in_row: int) -> None:
        """The counts of a checkpoint (a run of non-finite steps in a row continues over a resume)."""
        self.nonfinite_total, self.overflow_total, self.in_row = nonfinite_total, overflow_total, in_row
        self.pending = torch.tensor([0, 0, in_row, in_row, 0], dtype=torch.int64).to(self.pending.device)

    def consume(self, values: list[float]) -> tuple[int, int, int, int]:
        """Take `pending` as read on the host (`values`); returns (new non-finite, new overflows,
        longest run in a row, last non-finite step) and restarts the counts on the device."""
        new_nonfinite, new_overflow, run, worst, last = (int(v) for v in values)
        self.nonfinite_total += new_nonfinite
        self.overflow_total += new_overflow
        self.in_row = run
        self.pending = torch.tensor([0, 0, run, run, 0], dtype=torch.int64).to(self.pending.device, non_blocking=True)
        return new_nonfinite, new_overflow, worst, last - 1


class _Window:
    """Accumulates the steps between two log lines (throughput, data time, mean loss)."""

    def __init__(self):
        self.restart()
        self.steps, self.data, self.losses = 0, 0.0, []

    def restart(self) -> None:
        """Start timing afresh (after a checkpoint or evaluation), keeping the losses."""
        self.start, self.steps, self.data = time.perf_counter(), 0, 0.0

    def add(self, loss: torch.Tensor) -> None:
        self.steps += 1
        self.losses.append(loss)

    def mean_loss(self) -> torch.Tensor:
        """The mean loss of the window, on the device (NaN with no steps)."""
        return torch.stack(self.losses).mean() if self.losses else torch.tensor(float("nan"), dtype=torch.float64)


def set_aside_newer(run_dir: Path, step: int) -> None:
    """Rename checkpoints newer than `step` (a rollback or a fresh start in an old run directory) to
    `abandoned-step-*`: kept, but neither resumed from nor counted by `keep_last`."""
    for path in list_checkpoints(run_dir):
        if int(path.name.split("-")[1]) > step:
            target = path.with_name(f"abandoned-{path.name}")
            log.warning("checkpoint %s is newer than the start step %d: renamed to %s", path.name, step, target.name)
            path.rename(target)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows after `step` (they are about to be recomputed by the resumed run)."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines()
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(r + "\n" for r in kept))
