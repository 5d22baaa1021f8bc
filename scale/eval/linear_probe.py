"""Linear probing of a frozen backbone, the paper's protocol (the authors' main_lincls.py) by default.

- The backbone is frozen and in eval mode; the features are its pooled output (the class token
  after the final norm). It is checked bitwise unchanged at the end.
- A linear head per learning rate, weight N(0, 0.01), bias 0; SGD, momentum 0.9, weight decay 0;
  lr = base lr x global batch / 256 (base lr 3 for ViT: 12 at batch 1024), on the authors' cosine
  over epochs (set at the start of each epoch); 90 epochs; batch 1024.
- Training images: RandomResizedCrop(224) + flip; evaluation: Resize(256) + CenterCrop(224);
  top-1 and top-5 on the validation set.

Beyond it: several learning rates in one pass (one frozen forward feeds every head: the heads
are independent, so each equals a single-lr run at its lr, tested); an affine-free BatchNorm
before the heads (MAE's variant); cached features when augmentation is off (one frozen forward
per image in all; the epochs then cost almost nothing).

Distributed: every rank runs the frozen backbone on its own batches (nothing to shard: a frozen
ViT-H is 2.5 GB in fp32, 1.3 GB in bf16); the heads are wrapped in DDP; the evaluation counts are
all-reduced.

Resume and preemption, as pretraining: `OUT/probe_state.pt` holds the heads, the optimizer, the
position (epoch, batches done in it, step), the evaluations so far and the unlogged loss window;
rank 0 writes it atomically after every epoch and on the preemption signal (every rank stops at
the same step, after it; rank 0 then requeues the SLURM job). The same command resumes from it and
ends with the accuracies of an uninterrupted probe (tested): the heads' initialisation, the data
order and each sample's augmentation depend on (seed, epoch, position) alone. `OUT/probe_settings.json`
names the evaluation a folder belongs to: a resume must match it, and nothing is appended to
another evaluation's metrics (`scale.eval.inputs`). The state loads with weights only
(`scale.safe_load.load_safely`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scale.data.labelled import LabelledLoader, check_labels, eval_batches
from scale.data.sources import resolve_source
from scale.errors import ConfigError, DataError, RunDirInUseError
from scale.eval.backbone import LoadedBackbone
from scale.eval.inputs import apply_plan, plan_output, write_atomic
from scale.parallel.sync_batchnorm import convert_sync_batchnorm
from scale.safe_load import load_safely
from scale.train.metrics import MetricsLogger, Progress
from scale.train.preemption import Preempted, PreemptionWatch, requeue_slurm_job
from scale.train.run_dir import AsideFolder, cut_metrics
from scale.train.run_owner import RunDirOwner, claim_run_dir

log = logging.getLogger(__name__)

RESULTS = ("linear_probe.json", "linear_probe.md")
SETTINGS = "probe_settings.json"
STATE = "probe_state.pt"
OWNED = (*RESULTS, SETTINGS, STATE, "metrics.jsonl", "tensorboard")
"""Everything the probe writes into its output folder (and sets aside with --overwrite)."""
NOT_IDENTITY = ("num_workers", "progress", "tensorboard", "log_every", "extra")
"""Settings that change no result: a resume may differ in them."""


@dataclass
class ProbeSettings:
    """The probe's settings (the CLI's flags); defaults are the authors' protocol."""

    epochs: int = 90
    batch_size: int = 1024
    """Global batch (over all ranks)."""
    base_lrs: tuple[float, ...] = (3.0,)
    """One head per base lr; lr = base lr x batch / 256."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    batchnorm: bool = False
    """An affine-free BatchNorm before the heads (MAE's linear probe)."""
    augment: bool = True
    """RandomResizedCrop + flip for training; false: the evaluation crop, and features cached."""
    crop_size: int = 224
    crop_min: float = 0.08
    """RandomResizedCrop's smallest area fraction (the authors': torchvision's default 0.08)."""
    flip: bool = True
    """Random horizontal flips in training (the authors': on)."""
    labels_per_class: int = 0
    """Train on this many labelled samples per class (0: all): the low-shot probe (needs augment off)."""
    num_workers: int = 8
    seed: int = 0
    eval_every: int = 10
    """Evaluate every this many epochs (and after the last)."""
    precision: str = "auto"
    """The frozen forward: 'auto' (bf16 on GPUs), 'fp32', 'bf16'."""
    log_every: int = 20
    progress: bool = True
    tensorboard: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def lr(self, base: float) -> float:
        return base * self.batch_size / 256


class ProbeHeads(nn.Module):
    """(B, D) features -> one (B, C) logit tensor per head, after an optional affine-free BatchNorm."""

    def __init__(self, dim: int, num_classes: int, base_lrs: tuple[float, ...], batchnorm: bool, seed: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.heads = nn.ModuleList()
        for base in base_lrs:
            head = nn.Linear(dim, num_classes)
            # Each head's initial weights depend on its lr alone: a head equals the single-lr run's.
            g = torch.Generator().manual_seed(hash((seed, float(base))) % (2**63))
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
                head.bias.zero_()
            self.heads.append(head)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.norm(x)
        return [head(x) for head in self.heads]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _rank_world()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def probe_identity(checkpoint: str, train: str, val: str, settings: ProbeSettings, world: int) -> dict[str, Any]:
    """What makes two probes the same evaluation (library use; the command adds its own flags)."""
    fields = {k: v for k, v in asdict(settings).items() if k not in NOT_IDENTITY}
    return json.loads(json.dumps({"checkpoint": checkpoint, "train": train, "val": val, **fields, "world_size": world}))


@dataclass
class _Position:
    """Where the probe is: the epoch, batches done in it, steps in all, the loss window not logged
    yet, the evaluations so far, the seconds spent (what a resume continues from)."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    window: list[torch.Tensor] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save into a temporary file of the same folder, flushed to the disk, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def state_fingerprint(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class LinearProbe:
    """Build with a loaded backbone and the data sources; `run()` trains, evaluates and returns the
    results (also written to `out_dir`)."""

    def __init__(
        self,
        backbone: LoadedBackbone,
        train_source: str,
        val_source: str,
        out_dir: str | Path,
        settings: ProbeSettings,
        device: torch.device | None = None,
        comm_device: torch.device | None = None,
        *,
        identity: dict[str, Any] | None = None,
        overwrite: bool = False,
        preempt: PreemptionWatch | None = None,
        requeue: bool = True,
        max_requeues: int = 50,
        resolved: tuple[Any, Any] | None = None,
    ):
        """`identity`: what makes two probes the same evaluation (checked on resume; default: the
        checkpoint, the data and the settings). `overwrite`: set an earlier evaluation's files in
        `out_dir` aside instead of refusing. `preempt`: the watch of the preemption signal (None:
        no preemption stop); `requeue`, `max_requeues`: what then happens under SLURM."""
        self.s, self.loaded = settings, backbone
        self.overwrite, self.preempt, self.requeue, self.max_requeues = overwrite, preempt, requeue, max_requeues
        self.rank, self.world = _rank_world()
        self.device = device or torch.device("cpu")
        self.comm = comm_device or (self.device if self.device.type == "cuda" else torch.device("cpu"))
        self.out_dir = Path(out_dir)
        self.owner: RunDirOwner | None = None
        if settings.batch_size % self.world:
            raise ValueError(f"--batch-size {settings.batch_size} does not split over {self.world} ranks; "
                             "use a multiple of the world size")  # fmt: skip
        if (
            not settings.base_lrs
            or any(b <= 0 for b in settings.base_lrs)
            or len(set(settings.base_lrs)) < len(settings.base_lrs)
        ):
            raise ValueError(f"--lrs must be distinct positive base lrs, got {settings.base_lrs}")
        self.per_rank = settings.batch_size // self.world
        if settings.labels_per_class and settings.augment:
            raise ValueError("--labels-per-class works on cached features: add --no-augment")
        # `resolved`: the sources the command resolved while checking its arguments.
        self.train_src, self.val_src = resolved or (resolve_source(train_source), resolve_source(val_source))
        self.train_name, self.val_name = train_source, val_source
        for src, name in ((self.train_src, self.train_name), (self.val_src, self.val_name)):
            if sum(src.counts) == 0:
                raise DataError(f"{name} holds no samples; give a labelled image folder or shards")
        self.num_classes = check_labels(self.train_src, self.train_name)
        val_classes = check_labels(self.val_src, self.val_name)
        if val_classes > self.num_classes:
            raise DataError(
                f"{self.val_name} has labels up to {val_classes - 1} but {self.train_name} only {self.num_classes} "
                "classes: the validation classes must be among the training ones"
            )
        self.identity = identity if identity is not None else probe_identity(
            backbone.source, self.train_name, self.val_name, settings, self.world)  # fmt: skip
        self.backbone = backbone.model.to(self.device).eval()
        self.before = state_fingerprint(self.backbone)
        dtype = {"bf16": torch.bfloat16, "fp32": None}.get(settings.precision)
        if settings.precision == "auto":
            dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.autocast_dtype = dtype
        dim = self.backbone.cfg.embed_dim
        self.heads = ProbeHeads(dim, self.num_classes, settings.base_lrs, settings.batchnorm, settings.seed)
        self.heads.to(self.device)
        self.model: nn.Module = self.heads
        if self.world > 1:
            convert_sync_batchnorm(self.heads)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.heads, device_ids=ids)
        groups = [{"params": list(h.parameters()), "base_lr": b} for h, b in zip(self.heads.heads, settings.base_lrs,
                                                                                  strict=True)]  # fmt: skip
        self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=settings.momentum, weight_decay=settings.weight_decay)
        self.forward_seconds = 0.0
        self.forward_images = 0

    # ------------------------------------------------------------------ pieces

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen forward: (B, 3, S, S) -> (B, D) float32."""
        t = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            f = self.backbone.pooled_features(images).float()
        self.forward_seconds += time.perf_counter() - t
        self.forward_images += images.shape[0]
        return f

    def set_lr(self, epoch: int) -> None:
        """The authors' cosine over epochs: lr = lr0 x 0.5 x (1 + cos(pi x epoch / epochs))."""
        for g in self.optimizer.param_groups:
            g["lr"] = self.s.lr(g["base_lr"]) * 0.5 * (1.0 + math.cos(math.pi * epoch / self.s.epochs))

    def train_batch(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.model.train()
        logits = self.model(feats)
        losses = torch.stack([F.cross_entropy(x, labels) for x in logits])  # (H,)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # the heads are independent: each gets its own loss's gradient
        self.optimizer.step()
        return losses.detach()

    @torch.no_grad()
    def evaluate(self, batches) -> list[tuple[float, float]]:
        """(top-1, top-5) % of every head over the batches of every rank."""
        self.model.eval()
        H = len(self.s.base_lrs)
        counts = torch.zeros(H * 2 + 1, dtype=torch.float64, device=self.comm)
        for feats, labels in batches:
            labels = labels.to(feats.device)
            for i, logits in enumerate(self.heads(feats)):
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                counts[2 * i] += (top[:, 0] == labels).sum().to(self.comm)
                counts[2 * i + 1] += (top == labels[:, None]).any(1).sum().to(self.comm)
            counts[-1] += labels.shape[0]
        _all_reduce(counts)
        n = max(float(counts[-1]), 1.0)
        return [(100.0 * float(counts[2 * i]) / n, 100.0 * float(counts[2 * i + 1]) / n) for i in range(H)]

    def _val_features(self):
        for images, labels in eval_batches(self.val_src, rank=self.rank, world_size=self.world,
                                           crop_size=self.s.crop_size, batch_size=max(1, self.per_rank),
                                           num_workers=self.s.num_workers, device=self.device):  # fmt: skip
            yield self.features(images), labels

    def _cache(self, source) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        for images, y in eval_batches(source, rank=self.rank, world_size=self.world, crop_size=self.s.crop_size,
                                      batch_size=max(1, self.per_rank), num_workers=self.s.num_workers,
                                      device=self.device):  # fmt: skip
            feats.append(self.features(images))
            labels.append(y.to(self.device))
        dim = self.backbone.cfg.embed_dim
        return (torch.cat(feats) if feats else torch.zeros(0, dim, device=self.device),
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=self.device))  # fmt: skip

    def _few_labels(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep `labels_per_class` training samples of each class over all ranks (seeded): the
        low-shot linear probe, where features that need few labels show."""
        n = self.s.labels_per_class
        local = labels.cpu().tolist()
        everyone = [local]
        if self.world > 1:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, local)
        pairs = [(r, i, y) for r, ys in enumerate(everyone) for i, y in enumerate(ys)]
        g = torch.Generator().manual_seed(self.s.seed)
        order = torch.randperm(len(pairs), generator=g).tolist()
        taken: dict[int, int] = {}
        keep = []
        for j in order:
            r, i, y = pairs[j]
            if taken.get(y, 0) < n:
                taken[y] = taken.get(y, 0) + 1
                if r == self.rank:
                    keep.append(i)
        short = sorted(c for c in range(self.num_classes) if taken.get(c, 0) < n)
        if short:
            raise DataError(f"{self.train_name}: classes {short[:10]} have fewer than {n} samples; lower "
                            "--labels-per-class")  # fmt: skip
        idx = torch.tensor(sorted(keep), dtype=torch.int64, device=feats.device)
        return feats[idx], labels[idx]

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """Train the heads (resuming the unfinished probe `out_dir` holds), evaluate, write the
        results; on the preemption signal, save and raise `Preempted`. The output folder is held
        (`scale.train.run_owner`) from the start to the end, whatever happens."""
        try:
            return self._run()
        finally:
            self.release_output()

    def _run(self) -> dict[str, Any]:
        s = self.s
        main = self.rank == 0
        state = self._prepare_output()
        metrics = MetricsLogger(self.out_dir, main, s.tensorboard) if main else MetricsLogger(self.out_dir, False)
        if s.augment:
            loader = LabelledLoader(self.train_src, batch_size=self.per_rank, world_size=self.world, rank=self.rank,
                                    crop_size=s.crop_size, num_workers=s.num_workers, seed=s.seed,
                                    device=self.device, crop_scale=(s.crop_min, 1.0), flip=s.flip)  # fmt: skip
            steps_per_epoch = len(loader)
        else:
            cached_train = self._cache(self.train_src)
            if s.labels_per_class:
                cached_train = self._few_labels(*cached_train)
            cached_val = self._cache(self.val_src)
            n_local = torch.tensor([cached_train[0].shape[0]], device=self.comm)
            n_min = int(_all_reduce(n_local, dist.ReduceOp.MIN if self.world > 1 else None))
            steps_per_epoch = n_min // self.per_rank
            if steps_per_epoch < 1:
                raise DataError(f"{self.train_name}: {n_min} samples per rank, fewer than one batch of "
                                f"{self.per_rank}; lower --batch-size")  # fmt: skip
        pos = self._restore(state)
        if self.preempt is not None:
            self.preempt.any_rank = self._any_rank
        progress = Progress(s.epochs * steps_per_epoch, pos.step, main, s.progress)
        t0 = time.perf_counter() - pos.seconds
        try:
            for epoch in range(pos.epoch, s.epochs):
                self.set_lr(epoch)
                skip = pos.batches_done if epoch == pos.epoch else 0
                if skip >= steps_per_epoch:  # stopped after the epoch's last step, before its evaluation
                    batches = iter(())
                elif s.augment:
                    loader.load_state_dict({"epoch": epoch, "batches_done": skip})
                    batches = ((self.features(x), y.to(self.device)) for x, y in loader)
                else:
                    g = torch.Generator().manual_seed(hash((s.seed, epoch, self.rank)) % (2**63))
                    order = torch.randperm(cached_train[0].shape[0], generator=g)[: steps_per_epoch * self.per_rank]
                    batches = ((cached_train[0][idx], cached_train[1][idx])
                               for idx in order.to(self.device).split(self.per_rank)[skip:])  # fmt: skip
                done = skip
                for feats, labels in batches:
                    pos.window.append(self.train_batch(feats, labels))
                    pos.step += 1
                    done += 1
                    if pos.step % s.log_every == 0 or pos.step == s.epochs * steps_per_epoch:
                        loss = torch.stack(pos.window).mean(0)
                        row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                               **{f"loss/lr{b:g}": float(v) for b, v in zip(s.base_lrs, loss.tolist(), strict=True)},
                               "features_per_s": self.forward_images / max(self.forward_seconds, 1e-9)}  # fmt: skip
                        metrics.log(pos.step, row)
                        progress.line(pos.step, f"loss {float(loss.min()):.4f} {row['features_per_s']:.0f} features/s")
                        pos.window = []
                    progress.update(pos.step, {"epoch": str(epoch + 1)})
                    if self.preempt is not None and self.preempt.due(pos.step):
                        getattr(batches, "close", lambda: None)()  # release the loader's workers
                        pos.epoch, pos.batches_done, pos.seconds = epoch, done, time.perf_counter() - t0
                        self._stop_for_preemption(pos, saved=False)
                if (epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs:
                    acc = self.evaluate(self._val_features() if s.augment else
                                        [(cached_val[0][i:i + 1024], cached_val[1][i:i + 1024])
                                         for i in range(0, cached_val[0].shape[0], 1024)])  # fmt: skip
                    row = {f"val/top1/lr{b:g}": a1 for b, (a1, _) in zip(s.base_lrs, acc, strict=True)}
                    row.update({f"val/top5/lr{b:g}": a5 for b, (_, a5) in zip(s.base_lrs, acc, strict=True)})
                    metrics.log(pos.step, {"epoch": epoch + 1, **row})
                    pos.results.append({"epoch": epoch + 1, "acc": acc})
                    if main:
                        best = max(range(len(acc)), key=lambda i: acc[i][0])
                        log.info("epoch %d: best top-1 %.2f%% (base lr %g)", epoch + 1, acc[best][0], s.base_lrs[best])
                pos.epoch, pos.batches_done, pos.seconds = epoch + 1, 0, time.perf_counter() - t0
                if epoch + 1 < s.epochs:
                    saved = self._save_state(pos, required=False)
                    # Every rank, at every epoch's end: a signal during the evaluation stops here.
                    if self.preempt is not None and self.preempt.any_rank(self.preempt.received is not None):
                        self._stop_for_preemption(pos, saved=saved)
        finally:
            progress.close()
            metrics.close()
        self.check_backbone_unchanged()
        return self.write_results(pos.results[-1]["acc"], time.perf_counter() - t0)

    # ------------------------------------------------------------------ output, resume, preemption

    def release_output(self) -> None:
        """Give the output folder back (at the end, on preemption, on an error)."""
        if self.owner is not None:
            self.owner.release()
            self.owner = None

    def _broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.comm)
        return bool(_all_reduce(t, dist.ReduceOp.MAX if self.world > 1 else None).item())

    def _prepare_output(self) -> dict[str, Any] | None:
        """Rank 0 decides what `out_dir` holds (an earlier evaluation's results are refused without
        --overwrite, and set aside with it; an unfinished probe of these settings is resumed) and
        prepares it; every rank learns the decision, and reads the state to resume from."""
        decision: tuple[Any, str | None] = (None, None)
        if self.rank == 0:
            try:
                # One evaluation per folder at a time (the same command twice, or a requeue's take-over).
                self.owner = claim_run_dir(self.out_dir, stale_minutes=10)
                plan = plan_output(self.out_dir, OWNED, RESULTS, self.overwrite, SETTINGS, self.identity)
                aside = apply_plan(plan)
                if aside is not None:
                    log.warning("--overwrite: the earlier evaluation's %s moved to %s", ", ".join(plan.set_aside),
                                aside)  # fmt: skip
                has_state = plan.resume and (self.out_dir / STATE).is_file()
                if not plan.resume:
                    write_atomic(self.out_dir / SETTINGS, json.dumps(self.identity, indent=1) + "\n")
                decision = (has_state, None)
            except (ConfigError, RunDirInUseError) as e:  # every rank raises it, none is left waiting
                decision = (None, (type(e).__name__, str(e)))
        has_state, error = self._broadcast(decision)
        if error is not None:
            raise (RunDirInUseError if error[0] == RunDirInUseError.__name__ else ConfigError)(error[1])
        if not has_state:
            if self.rank == 0:
                self._rewind(0)
            return None
        state = load_safely(self.out_dir / STATE)
        if not isinstance(state, dict) or state.get("identity") != self.identity:
            raise ConfigError(f"{self.out_dir / STATE} is the state of another probe; pass --overwrite to set it "
                              "aside, or choose another --out")  # fmt: skip
        if self.rank == 0:
            self._rewind(int(state["step"]))
            log.info("resuming the probe in %s at epoch %d, step %d (%d batches into the epoch)", self.out_dir,
                     state["epoch"] + 1, state["step"], state["batches_done"])  # fmt: skip
        return state

    def _rewind(self, step: int) -> None:
        """Rows of metrics.jsonl after `step` (recomputed now) set aside in OUT/abandoned/, never deleted."""
        cut_metrics(self.out_dir / "metrics.jsonl", step, AsideFolder(self.out_dir, step))

    def _restore(self, state: dict[str, Any] | None) -> _Position:
        if state is None:
            return _Position()
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.forward_seconds, self.forward_images = float(state["forward_seconds"]), int(state["forward_images"])
        window = state["window"].to(self.device)
        return _Position(int(state["epoch"]), int(state["batches_done"]), int(state["step"]),
                         [w for w in window], [dict(r) for r in state["results"]],
                         float(state["seconds"]))  # fmt: skip

    def _save_state(self, pos: _Position, required: bool) -> bool:
        """Rank 0 writes `STATE` atomically. A failure after an epoch is a warning (the probe goes on,
        a resume starts from the state before); `required` (the preemption's) raises."""
        if self.rank != 0:
            return True
        H = len(self.s.base_lrs)
        state = {
            "format": 1, "identity": self.identity, "epoch": pos.epoch, "batches_done": pos.batches_done,
            "step": pos.step, "heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
            "window": torch.stack(pos.window).cpu() if pos.window else torch.zeros(0, H),
            "results": [{"epoch": r["epoch"], "acc": [list(a) for a in r["acc"]]} for r in pos.results],
            "forward_seconds": self.forward_seconds, "forward_images": self.forward_images, "seconds": pos.seconds,
        }  # fmt: skip
        try:
            _save_atomic(state, self.out_dir / STATE)
            return True
        except (OSError, RuntimeError) as e:
            if required:
                raise
            log.warning("the probe's state after epoch %d could not be written (%s); a resume starts from the one "
                        "before", pos.epoch, " ".join(str(e).split())[:200])  # fmt: skip
            return False

    def _stop_for_preemption(self, pos: _Position, saved: bool) -> None:
        """Every rank: the state of this step (rank 0), then the requeue (rank 0, under SLURM), then
        `Preempted`. See `scale.train.preemption`."""
        watch = self.preempt
        when = f"{time.time() - watch.received:.0f} s ago" if watch.received is not None else "on another rank"
        watch.received = None
        if self.rank == 0:
            log.warning("%s received %s: stopping the probe at step %d (epoch %d) after saving its state", watch.name,
                        when, pos.step, pos.epoch + (1 if pos.batches_done else 0))  # fmt: skip
        if not saved:
            self._save_state(pos, required=True)
        if self.world > 1:
            dist.barrier()
        requeued, why = False, "run the same command again to resume"
        if self.rank == 0 and self.requeue:
            requeued, why = requeue_slurm_job(self.max_requeues, "--max-requeues")
        requeued, why = self._broadcast((requeued, why))
        if self.rank == 0:
            (log.warning if requeued else log.error)("probe preempted at step %d: %s", pos.step, why)
        raise Preempted(pos.step, requeued, f"probe stopped at step {pos.step} on {watch.name}: {why}")

    def check_backbone_unchanged(self) -> None:
        after = self.backbone.state_dict()
        changed = [k for k, v in self.before.items() if not torch.equal(v, after[k])]
        if changed:
            raise RuntimeError(f"the frozen backbone changed during probing ({', '.join(changed[:5])}): a bug")

    def write_results(self, acc: list[tuple[float, float]], seconds: float) -> dict[str, Any]:
        s = self.s
        best = max(range(len(acc)), key=lambda i: acc[i][0])
        result = {
            "checkpoint": self.loaded.source, "checkpoint_kind": self.loaded.kind, "pretrain_step": self.loaded.step,
            "model": self.loaded.name, "train_source": self.train_name, "val_source": self.val_name,
            "num_classes": self.num_classes, "world_size": self.world, "settings": {**asdict(s), "extra": None},
            "lrs": [{"base_lr": b, "lr": s.lr(b), "top1": a1, "top5": a5}
                    for b, (a1, a5) in zip(s.base_lrs, acc, strict=True)],
            "best": {"base_lr": s.base_lrs[best], "lr": s.lr(s.base_lrs[best]), "top1": acc[best][0],
                     "top5": acc[best][1]},
            "features_per_s": self.forward_images / max(self.forward_seconds, 1e-9),
            "seconds": seconds,
        }  # fmt: skip
        if self.rank == 0:
            write_atomic(self.out_dir / "linear_probe.json", json.dumps(result, indent=1))
            step = f", pretraining step {result['pretrain_step']}" if result["pretrain_step"] is not None else ""
            augment = (f"RandomResizedCrop({s.crop_min:g}-1){' + flip' if s.flip else ''}" if s.augment
                       else "no augmentation (cached features)")  # fmt: skip
            if s.labels_per_class:
                augment += f", {s.labels_per_class} labels per class"
            lines = [f"# Linear probe: {result['model']} from {result['checkpoint']}", "",
                     f"{result['checkpoint_kind']}{step}; {s.epochs} epochs, batch {s.batch_size}, SGD momentum "
                     f"{s.momentum}, weight decay {s.weight_decay}, {augment}"
                     f"{', BatchNorm before the head' if s.batchnorm else ''}; train {self.train_name}, "
                     f"val {self.val_name} ({self.num_classes} classes); {self.world} rank(s); "
                     f"{result['features_per_s']:.0f} frozen features/s per rank.", "",
                     "| base lr | lr | top-1 | top-5 |", "|---:|---:|---:|---:|"]  # fmt: skip
            for r in result["lrs"]:
                mark = " (best)" if r["base_lr"] == result["best"]["base_lr"] else ""
                lines.append(f"| {r['base_lr']:g}{mark} | {r['lr']:g} | {r['top1']:.2f} | {r['top5']:.2f} |")
            write_atomic(self.out_dir / "linear_probe.md", "\n".join(lines) + "\n")
        return result
