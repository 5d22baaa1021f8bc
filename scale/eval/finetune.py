"""End-to-end fine-tuning through pretraining's trainer and backends (`FinetuneTrainer`).

The trainer's loop, checkpoints, exact resume, preemption and requeue, non-finite skips, progress,
metrics.jsonl and TensorBoard are pretraining's (`scale.train.trainer.Trainer`); this module
defines what differs: the model (a backbone from a checkpoint with a linear classifier and its
EMA, `scale.models.classifier`), the input (DeiT's augmentation, repeated augmentation and mixup,
`scale.data.finetune`), the schedules (DeiT's warmup from 1e-6 and cosine to 1e-5; the EMA's
constant decay in place of the momentum schedule) and the evaluation after epochs: top-1 / top-5 of
the model and of its EMA on `data.eval_source`, written to metrics.jsonl and, at the end, to
`results.json` in the run directory (the linear probe's form).

Every backend lays the classifier out as it lays MoCo out (`scale.train.parallelize`): DDP
replicates it, FSDP2 and ZeRO-3 shard the EMA exactly like the model (its update runs on local
shards, in fp32), activation checkpointing recomputes the backbone's blocks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2 as T

from scale.config import Config
from scale.data.augment import Normalize
from scale.data.finetune import FinetuneAugment, FinetuneLoader
from scale.data.labelled import check_labels
from scale.data.sources import ShardSource, resolve_source
from scale.errors import ConfigError, DataError
from scale.eval.backbone import load_frozen_backbone, resolve_run_checkpoint
from scale.models import build_backbone, is_resnet
from scale.models.classifier import Classifier
from scale.models.export import is_export
from scale.models.flops import backbone_macs
from scale.optim import lr_at
from scale.safe_load import load_safely
from scale.train.knn import _share
from scale.train.metrics import MetricsLogger
from scale.train.trainer import Trainer

log = logging.getLogger(__name__)


def num_classes_of(source: str) -> int:
    """The classes of a labelled training source (`check_labels`: its classes file, or its folders)."""
    return check_labels(resolve_source(source), f"--data.source={source}")


def finetune_overrides(cfg: Config, name: str) -> dict[str, Any]:
    """The backbone options fine-tuning sets: the crop size, and for ViTs the stochastic depth."""
    out: dict[str, Any] = {"img_size": cfg.model.img_size}
    if not is_resnet(name):
        out["drop_path_rate"] = cfg.finetune.drop_path
    return out


def run_config(path: str) -> dict[str, Any] | None:
    """The resolved config of a run (or checkpoint) directory of this project; None for anything else."""
    p = Path(path).expanduser()
    ckpt = resolve_run_checkpoint(p) if p.is_dir() and not is_export(p) else None
    if ckpt is None:
        return None
    return load_safely(ckpt / "client.pt").get("config")


def build_classifier(cfg: Config, num_classes: int) -> Classifier:
    """The backbone of `cfg.finetune.pretrained` (or of `cfg.model` at random init, seeded by
    `run.seed` as pretraining seeds its model) with a classifier of `num_classes`, every parameter
    trainable (the frozen patch projection and position table of pretraining too, as DeiT's timm
    model trains them), and its EMA."""
    f = cfg.finetune
    torch.manual_seed(cfg.run.seed)
    if f.pretrained:
        run = run_config(f.pretrained)
        if run is not None:  # a run of this project: its architecture, recorded in this run's config
            for key in ("name", "patch_size", "use_bn", "embed_dim", "depth", "num_heads", "pool", "pos_embed"):
                if key in run["model"]:
                    setattr(cfg.model, key, run["model"][key])
        name = cfg.model.name
        loaded = load_frozen_backbone(f.pretrained, model=None if run is not None else name, encoder=f.encoder,
                                      **finetune_overrides(cfg, name))  # fmt: skip
        backbone = loaded.model
    else:
        name = cfg.model.name
        backbone = build_backbone(name, **{**cfg.model.vit_overrides(), **finetune_overrides(cfg, name)})
    backbone.train().requires_grad_(True)
    return Classifier(backbone, num_classes, ema=f.ema_decay > 0)


class FinetuneTrainer(Trainer):
    """Pretraining's trainer with fine-tuning's model, data, schedules and evaluation."""

    def __init__(self, cfg: Config, loader=None, backend=None):
        if cfg.task != "finetune":
            raise ConfigError(f"the recipe {cfg.recipe!r} is a pretraining recipe; fine-tune with a *_finetune recipe")
        self.num_classes = cfg.finetune.num_classes or num_classes_of(cfg.data.source)
        self.results: dict[str, Any] = {}
        self.evaluated_at: int | None = None
        super().__init__(cfg, loader, backend)

    # ------------------------------------------------------------------ the task

    def augment(self) -> FinetuneAugment:
        f, m = self.cfg.finetune, self.cfg.model
        return FinetuneAugment(
            img_size=m.img_size, num_classes=self.num_classes, crop_min=self.cfg.data.crop_min,
            auto_augment=f.auto_augment,
            interpolation=f.interpolation, reprob=f.reprob, color_jitter=f.color_jitter, mixup=f.mixup,
            cutmix=f.cutmix, mixup_prob=f.mixup_prob, mixup_switch_prob=f.mixup_switch_prob,
            smoothing=f.smoothing, repeats=f.repeats,
        )  # fmt: skip

    def build_loader(self, per_device: int):
        cfg, b = self.cfg, self.backend
        return FinetuneLoader(cfg.data.source, self.augment(), batch_size=per_device, world_size=b.world_size,
                              rank=b.rank, num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                              shuffle_buffer=cfg.data.shuffle_buffer,
                              device=b.device if b.device.type == "cuda" else None)  # fmt: skip

    def build_model(self) -> Classifier:
        return build_classifier(self.cfg, self.num_classes)

    def training_flops(self) -> float:
        """One crop's forward and backward: 3 x 2 x MACs (the EMA runs no forward in training)."""
        return 6.0 * backbone_macs(self.backbone_cfg)

    def lr_at(self, step: int) -> float:
        d, f = self.derived, self.cfg.finetune
        return lr_at(step, d.lr, d.warmup_steps, d.total_steps, start_lr=min(f.warmup_lr, d.lr), end_lr=f.min_lr)

    def momentum_at(self, step: int) -> float:
        """The EMA's decay: constant (DeiT's ModelEma)."""
        return self.cfg.finetune.ema_decay if self.cfg.finetune.ema_decay > 0 else 1.0

    def train_step(self, micro_batches: list) -> dict[str, Any]:
        """Pretraining's step, with torch's generator seeded from (seed, step, rank) first: the
        model's own randomness (drop path) is then the same after a resume as without one (a
        resumed DataLoader draws from the generator when it starts), and differs between ranks."""
        seed = np.random.SeedSequence([self.cfg.run.seed, self.step, self.backend.rank]).generate_state(1)[0]
        torch.manual_seed(int(seed))
        return super().train_step(micro_batches)

    def end_of_epoch(self, epoch: int, row: dict[str, Any], metrics: MetricsLogger) -> None:
        every = self.cfg.finetune.eval_every_epochs
        if every and epoch % every == 0 and self.cfg.data.eval_source:
            row.update(self.evaluate_and_log(metrics))

    def _log_start(self) -> None:
        super()._log_start()
        if self.backend.is_main:
            f = self.cfg.finetune
            log.info("fine-tuning %s from %s: %d classes; drop path %g, layer decay %g, EMA %g; mixup %g, cutmix %g, "
                     "smoothing %g, %s, random erasing %g, %d repeat(s)", self.cfg.model.name,
                     f.pretrained or "random init", self.num_classes, f.drop_path, f.layer_decay, f.ema_decay,
                     f.mixup, f.cutmix, f.smoothing, f.auto_augment or "no RandAugment", f.reprob,
                     f.repeats)  # fmt: skip

    # ------------------------------------------------------------------ evaluation

    def evaluate_and_log(self, metrics: MetricsLogger | None) -> dict[str, float]:
        """Top-1 / top-5 (%) of the model and its EMA on `data.eval_source`, logged as a metrics row."""
        t0 = time.perf_counter()
        out = self.evaluate()
        if metrics is not None:
            metrics.log(self.step, out)
        if self.backend.is_main:
            ema = f", EMA {out['ema_top1']:.2f} / {out['ema_top5']:.2f}" if "ema_top1" in out else ""
            log.info("step %d: top-1 / top-5 on %s: %.2f / %.2f%s (%.0f s)", self.step, self.cfg.data.eval_source,
                     out["top1"], out["top5"], ema, time.perf_counter() - t0)  # fmt: skip
        self.results, self.evaluated_at = out, self.step
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.backend.eval_model()
        out = {}
        for prefix, encoder in (("", model.base_encoder), ("ema_", model.momentum_encoder)):
            if encoder is None:
                continue
            if prefix:
                model.sync_buffers()  # the EMA evaluated with the model's BatchNorm statistics (timm's exclude_buffers)
            top1, top5 = self._accuracy(encoder)
            out[f"{prefix}top1"], out[f"{prefix}top5"] = top1, top5
        return out

    def _accuracy(self, encoder: torch.nn.Module) -> tuple[float, float]:
        """Top-1 and top-5 (%) of `encoder`'s logits over every sample of `data.eval_source`: each rank
        its contiguous share (padded: every rank runs the same forwards), counts all-reduced."""
        b, cfg = self.backend, self.cfg
        size, pct = cfg.model.img_size, cfg.finetune.eval_crop_pct
        modes = T.InterpolationMode
        interp = modes.BILINEAR if cfg.finetune.interpolation == "bilinear" else modes.BICUBIC
        resize = T.Compose([T.Resize(math.floor(size / pct), interpolation=interp, antialias=True), T.CenterCrop(size)])
        src = resolve_source(cfg.data.eval_source)
        runs, per_rank = _share(src.counts, b.rank, b.world_size)
        batch_size = max(1, self.derived.batch_size_per_device)
        normalize = Normalize()
        counts = torch.zeros(3, dtype=torch.float64, device=b.device)  # top-1, top-5, samples
        was_training = encoder.training
        float64 = next(encoder.parameters()).dtype == torch.float64
        encoder.eval()
        with b.evaluation(encoder, "forward") as forward:

            def flush(images: list[torch.Tensor], labels: list[int]) -> None:
                x = normalize(torch.stack(images).to(b.device))
                if float64:  # a float64 model (the equality tests): its input too
                    x = x.double()
                with b.autocast():
                    logits = forward(x).float()
                y = torch.tensor(labels, device=b.device)
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hit = (top == y[:, None]) & (y[:, None] >= 0)
                counts.add_(torch.stack([hit[:, 0].sum(), hit.any(1).sum(), (y >= 0).sum()]).double())

            forwards, images, labels = 0, [], []
            for unit, lo, hi in runs:
                reader = src.read(unit, lo, hi) if isinstance(src, ShardSource) else [src.read_one(unit, 0)]
                for key, data, label in reader:
                    try:
                        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                             mode=ImageReadMode.RGB)  # fmt: skip
                    except Exception:
                        log.warning("evaluation: skipping undecodable sample %s", key)
                        continue
                    images.append(resize(image))
                    labels.append(label)
                    if len(images) == batch_size:
                        flush(images, labels)
                        forwards, images, labels = forwards + 1, [], []
            if images:
                flush(images, labels)
                forwards += 1
            for _ in range(-(-per_rank // batch_size) - forwards):  # padding forwards, not counted
                flush([torch.zeros(3, size, size, dtype=torch.uint8)], [-1])
        encoder.train(was_training)
        if b.world_size > 1:
            c = counts.to(b.comm_device())
            dist.all_reduce(c)
            counts = c
        top1, top5, n = counts.tolist()
        if not n:
            raise DataError(f"--data.eval_source={cfg.data.eval_source} holds no labelled samples to evaluate on")
        return 100.0 * top1 / n, 100.0 * top5 / n

    # ------------------------------------------------------------------ the run

    def after_training(self, result: dict[str, Any]) -> dict[str, Any]:
        """Evaluate the final model and its EMA (a row of metrics.jsonl) and write results.json."""
        if self.cfg.data.eval_source:
            if self.evaluated_at != self.step:
                metrics = MetricsLogger(self.run_dir, self.backend.is_main, self.cfg.run.tensorboard)
                try:
                    self.evaluate_and_log(metrics)
                finally:
                    metrics.close()
            result.update(self.results)
            if self.backend.is_main:
                self.write_results(result)
        return result

    def write_results(self, result: dict[str, Any]) -> Path:
        """`results.json` and `results.md` in the run directory, written atomically: the final
        accuracies of the model and its EMA and what produced them."""
        f = self.cfg.finetune
        out = {
            "task": "finetune",
            "recipe": self.cfg.recipe,
            "pretrained": f.pretrained or "random init",
            "model": self.cfg.model.name,
            "train": self.cfg.data.source,
            "val": self.cfg.data.eval_source,
            "num_classes": self.num_classes,
            "step": self.step,
            "epochs": self.step / self.derived.steps_per_epoch,
            **{k: result[k] for k in ("top1", "top5", "ema_top1", "ema_top5") if k in result},
        }
        rows = [("model", out.get("top1"), out.get("top5")), ("EMA", out.get("ema_top1"), out.get("ema_top5"))]
        lines = [f"# Fine-tuning: {out['model']} from {out['pretrained']}", "",
                 f"recipe {out['recipe']}; train {out['train']}, val {out['val']} ({out['num_classes']} classes); "
                 f"{out['step']} steps ({out['epochs']:g} epochs).", "", "| | top-1 | top-5 |", "|---|---:|---:|",
                 *(f"| {name} | {a:.2f} | {b:.2f} |" for name, a, b in rows if a is not None)]  # fmt: skip
        for name, text in (("results.json", json.dumps(out, indent=1)), ("results.md", "\n".join(lines) + "\n")):
            path = self.run_dir / name
            tmp = path.with_name(f".{name}.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)  # atomic: never a torn results file
        log.info("results: %s (and .md)", self.run_dir / "results.json")
        return self.run_dir / "results.json"
