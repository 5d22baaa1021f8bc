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
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from scale.config import Config, Derived, default_run_name, derive, split_batch
from scale.data.augment import AugmentConfig
from scale.data.loader import build_loader
from scale.errors import CheckpointWriteError, DataError, RunDirInUseError, StalledRankError, TrainingError
from scale.hardware.cpu_malloc import tune_cpu_malloc
from scale.hardware.peaks import device_peak, peak_memory_gib
from scale.hardware.precision import configure_tf32
from scale.models.flops import moco_training_flops
from scale.optim import lr_at, momentum_at, weight_decay_at
from scale.parallel.base import Backend
from scale.parallel.launch import build_backend, init_distributed
from scale.safe_load import trust_checkpoint_code
from scale.train.checkpoint import (
    FailurePolicy,
    clean_leftovers,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from scale.train.faults import fault_point
from scale.train.knn import heldout_knn
from scale.train.memory import check_memory
from scale.train.metrics import MetricsLogger, Progress
from scale.train.monitors import RunMonitors
from scale.train.parallelize import build_model, grad_groups, parallelize
from scale.train.planner import resolve_auto
from scale.train.preemption import Preempted, PreemptionWatch, requeue_slurm_job, restart_count, watch_signal
from scale.train.run_dir import check_run_dir, rewind, write_config
from scale.train.run_owner import RunDirOwner, claim_run_dir
from scale.train.step_stats import LogWindow, SkipCounter
from scale.train.watchdog import Heartbeat, is_collective_failure

log = logging.getLogger(__name__)


def global_keys(backend: Backend, micro_batches: list) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """For each micro-batch of an accumulated step: every micro-batch's keys (gathered over the
    ranks, concatenated in micro-batch order: (A x K, F) per view) and the row of its first positive
    (micro-batch j of rank r: j K + r B), for `Backend.forward_backward(..., keys=)`."""
    keys = [backend.keys(x1, x2) for x1, x2, *_ in micro_batches]
    k1, k2, K = torch.cat([k for k, _ in keys]), torch.cat([k for _, k in keys]), keys[0][0].shape[0]
    return [(k1, k2, j * K + backend.rank * len(x1)) for j, (x1, *_) in enumerate(micro_batches)]


class Trainer:
    """Build everything from `cfg` (or take a prepared `loader` / `backend`) and `fit()`."""

    def __init__(self, cfg: Config, loader=None, backend=None):
        self.cfg = cfg
        # First of all: a preemption signal during the start-up (minutes for ViT-H) is recorded, not
        # fatal (SIGUSR2's default action ends the process); acted on at the first check.
        self.preempt = watch_signal(cfg.run.preempt_signal, cfg.run.preempt_check_every)
        init_distributed(cfg.parallel.dist_backend, cfg.parallel.timeout_minutes)
        trust_checkpoint_code(cfg.run.trust_checkpoint_code)  # the user's explicit choice, logged when on
        if backend is None:
            resolve_auto(cfg)  # --parallel.backend=auto on GPUs: the planner's backend, logged with the runner-up
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
        self.owner = self._claim_run_dir()  # one job per run directory, before anything is written into it
        try:
            self._build(cfg, b, per_device, loader)
        except BaseException:
            self.release_run_dir()
            raise

    def _claim_run_dir(self) -> RunDirOwner | None:
        """The main rank takes the run directory (`scale.train.run_owner`); every rank raises its
        error when another live job holds it."""
        b, owner, error = self.backend, None, None
        if b.is_main:
            try:
                owner = claim_run_dir(self.run_dir, self.cfg.run.stale_owner_minutes)
            except RunDirInUseError as e:
                error = str(e)
        error = b.broadcast_object(error)
        if error:
            raise RunDirInUseError(error)
        return owner

    def release_run_dir(self) -> None:
        """Give the run directory back (at the end of `fit`, or when the start fails)."""
        if self.owner is not None:
            self.owner.release()
            self.owner = None

    def _build(self, cfg: Config, b, per_device: int, loader) -> None:
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank

        self.loader = loader or self.build_loader(per_device)
        self.derived: Derived = derive(cfg, b.world_size, len(self.loader) * per_device * b.world_size)

        laid = parallelize(cfg, b, self.derived, self.build_model())  # the model laid out, and its optimizer
        self.optimizer_description, self.compute_description = laid.optimizer, laid.compute
        self.backbone_cfg = laid.model.base_encoder.cfg
        num_samples = len(self.loader) * per_device * b.world_size
        per_rank_images = per_device * self.derived.grad_accum_steps
        self.monitors = RunMonitors(cfg.monitor, b, b.module.base_encoder, grad_groups(b.module), num_samples,
                                    self.derived.global_batch_size, per_rank_images)  # fmt: skip
        self.metrics: MetricsLogger | None = None
        self.flops_per_image = self.training_flops()
        self.peak_flops, self.peak_label = device_peak(b.device, b.compute_precision)
        self.step = 0
        self.skips = SkipCounter(b.device)
        self.last_saved_step: int | None = None
        self.ckpt_failures = FailurePolicy(self.run_dir, cfg.run.ckpt_failure, cfg.run.max_ckpt_failures)
        self.heartbeat = Heartbeat(b.rank, b.world_size, cfg.parallel.timeout_minutes * 60)
        b.barrier()  # every rank has checked the run directory before rank 0 writes into it

    # ------------------------------------------------------------------ what a task defines
    # Pretraining's (MoCo v3) here; fine-tuning overrides them (`scale.eval.finetune.FinetuneTrainer`).

    def build_loader(self, per_device: int):
        """This rank's training batches: (view 1, view 2, labels) for MoCo."""
        cfg, b = self.cfg, self.backend
        return build_loader(
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

    def build_model(self):
        """The model to lay out; None: `parallelize` builds MoCo v3 from the config."""
        return None

    def training_flops(self) -> float:
        """FLOPs per training image (for MFU)."""
        cfg = self.cfg
        return moco_training_flops(self.backbone_cfg, cfg.model.dim, cfg.model.mlp_dim).total

    def lr_at(self, step: int) -> float:
        d = self.derived
        return lr_at(step, d.lr, d.warmup_steps, d.total_steps)

    def momentum_at(self, step: int) -> float:
        """The momentum encoder's coefficient after `step` steps."""
        s = self.cfg.schedule
        return momentum_at(step, self.derived.total_steps, s.momentum, s.final_momentum)

    def end_of_epoch(self, epoch: int, row: dict[str, Any], metrics: MetricsLogger) -> None:
        """After each complete epoch but the last (its checkpoint written): the held-out kNN monitor."""
        every = self.cfg.monitor.heldout_every_epochs
        if every and epoch % every == 0:
            row["knn_top1"] = self.knn_monitor()
            metrics.log(self.step, {"knn_top1": row["knn_top1"]})

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
        log.info("%s", self.compute_description)
        log.info("derived: %s", d.summary())
        if d.grad_accum_steps > 1 and cfg.task != "pretrain":
            pass  # no contrastive keys: each micro-batch's loss is its own
        elif d.grad_accum_steps > 1 and cfg.batch.keys == "global":
            log.info("gradient accumulation: every micro-batch's keys first, so each loss contrasts the global "
                     "batch's %d keys (the heads' BatchNorm statistics stay per micro-batch)",
                     d.negatives_per_loss)  # fmt: skip
        elif d.grad_accum_steps > 1:
            log.info("gradient accumulation with --batch.keys=micro: each loss contrasts %d keys (micro-batch x world "
                     "size), not the global batch's %d", d.negatives_per_loss, d.global_batch_size)  # fmt: skip
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
        try:
            path = save_checkpoint(self.backend, self.run_dir, self.step, self._client_state(), self.cfg.run.keep_last)
        except CheckpointWriteError as e:
            self.ckpt_failures.failed(e, final)  # raises when the run must stop
            return None
        self.ckpt_failures.succeeded()
        self.last_saved_step = self.step
        return path

    def _prepare_run_dir(self) -> None:
        if self.backend.is_main:
            write_config(self.run_dir, self.cfg)
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
            rewind(self.run_dir, start)
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
        lr = self.lr_at(self.step)
        wd = weight_decay_at(self.step, cfg.optim.weight_decay, cfg.optim.final_weight_decay, d.total_steps)
        saved = b.snapshot_buffers()
        keys = self._global_keys(micro_batches)
        losses = [
            b.forward_backward(x1, x2, d.grad_accum_steps, last=i == len(micro_batches) - 1,
                               keys=None if keys is None else keys[i])
            for i, (x1, x2, _) in enumerate(micro_batches)
        ]  # fmt: skip
        result = b.step(lr, wd, cfg.optim.clip_grad, measure_groups=self.monitors.measure_grads(self.step + 1))
        loss = torch.stack(losses).double().mean()
        next_momentum = self.momentum_at(self.step + 1)
        b.restore_buffers(saved, result.applied)
        b.momentum_update(next_momentum, result.applied)
        self.skips.add(self.step, result.applied, b.scaler_overflow(loss))
        self.step += 1
        self.monitors.after_step(self.step, micro_batches, result.group_norms)
        return {"loss": loss, "lr": lr, "weight_decay": wd, "momentum": next_momentum, "grad_norm": result.grad_norm}

    def _global_keys(self, micro_batches: list) -> list[tuple[torch.Tensor, torch.Tensor, int]] | None:
        """`global_keys` with accumulation and `batch.keys=global`; None otherwise."""
        if len(micro_batches) == 1 or self.cfg.batch.keys != "global" or self.cfg.task != "pretrain":
            return None
        return global_keys(self.backend, micro_batches)

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
        """Train to the end of the schedule (or `schedule.max_steps`), then `after_training`; returns
        the final metrics. The run directory is given back at the end, whatever happened."""
        try:
            return self.after_training(self._train())
        finally:
            self.release_run_dir()

    def after_training(self, result: dict[str, Any]) -> dict[str, Any]:
        """What a task does after its last step (the run directory still held): nothing here."""
        return result

    def _train(self) -> dict[str, Any]:
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
        window = LogWindow()
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
                        window = LogWindow()
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
                if self.step < stop:
                    self.end_of_epoch(epoch, row, metrics)
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

    def _log_row(self, step_metrics: dict[str, Any], window: LogWindow) -> dict[str, Any]:
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

    def knn_monitor(self, backbone: torch.nn.Module | None = None) -> float:
        """The held-out kNN top-1 (%) of `backbone` (default: the base encoder's, as the backend runs
        it): `data.eval_source` classified against `data.knn_train_source` (`scale.train.knn`). NaN
        when they are not configured."""
        d, m = self.cfg.data, self.cfg.monitor
        if not (d.eval_source and d.knn_train_source):
            return float("nan")
        return heldout_knn(self.backend, d.knn_train_source, d.eval_source, self.cfg.model.img_size, m.knn_k,
                           m.knn_temperature, backbone)  # fmt: skip

    def knn_random_init(self) -> float:
        """The held-out kNN monitor on the same backbone at its initial (random) weights."""
        torch.manual_seed(self.cfg.run.seed)
        fresh = build_model(self.cfg).base_encoder.to(self.backend.device)
        return self.knn_monitor(fresh)
