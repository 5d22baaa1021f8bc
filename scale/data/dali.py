"""MoCo v3's two views on NVIDIA DALI: GPU decode and augmentation, or DALI's CPU-only mode. DALI is
an optional dependency: imported inside the functions that need it.

With a `device_id`, images are decoded by nvJPEG ('mixed') and augmented on that GPU; without
one, the same graph runs in DALI's CPU-only mode (`device_id=None`), which is how its logic is
tested on machines without a GPU. Reads webdataset shards (`fn.readers.webdataset` with the index
files that `scale-make-shards` writes) or an ImageFolder tree (`fn.readers.file`), sharded by rank.

Same semantics as `augment.py`, with these deliberate differences (the tests bound their effect):
- Colour jitter: DALI applies brightness and contrast, then saturation and hue, in this fixed
  order; torchvision draws a random order per image. Contrast pivots on the image's mean luminance
  as in torchvision. Hue is rotated in YIQ space by
  +-360 * hue degrees (`fn.hsv`), torchvision shifts it in HSV space by +-hue turns.
- Grayscale is `fn.hsv(saturation=0)`: luma 0.299 R + 0.587 G + 0.114 B, torchvision's weights.
- Blur: the same 2 * ceil(3 * sigma_max) + 1 window and sigma range; applied with its probability
  by blending, so the choice is per image.
- Resize: linear with antialiasing in both.

Epochs: the pipeline is rebuilt every epoch with a seed from (seed, epoch, rank) (`pipeline_seed`:
every rank draws its own crops, jitter, blur, solarize and flips; the torchvision path seeds each
sample by its id) and the units (shards or files) in the order of the torchvision path's
per-epoch permutation, the same on every rank; the
reader gives each rank a contiguous, disjoint part of that order and shuffles it with its buffer.
Every rank stops after `num_samples // (world_size * batch_size)` batches. Position: epoch and
batches handed out; a mid-epoch resume replays the epoch's first batches (decoding them) and lands
on the same next batch (DALI's random streams are seeded per pipeline).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from scale.data.augment import AugmentConfig
from scale.data.epoch_loader import Batch, EpochLoader, check_resume_layout
from scale.data.epoch_plan import batches_per_rank, epoch_order
from scale.data.shards import IMAGE_EXTS, LABEL_BIN_EXT, index_path

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "NVIDIA DALI is not installed: pip install nvidia-dali-cuda120 (CUDA 12; nvidia-dali-cuda130 for CUDA 13), "
    "or `pip install -e .[dali]`; or use --data.backend=torchvision"
)


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn, types


def _view(fn, types, images, cfg: AugmentConfig, view: int, device: str):
    import nvidia.dali.math as dmath

    """One view from decoded uint8 HWC images (DALI graph)."""
    crop = fn.random_resized_crop(
        images,
        device=device,
        size=[cfg.crop_size, cfg.crop_size],
        random_area=list(cfg.crop_scale),
        random_aspect_ratio=list(cfg.crop_ratio),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    b, c, s, h = cfg.jitter
    jitter = fn.random.coin_flip(probability=cfg.jitter_p)

    def around(centre: float, spread: float):  # centre + jitter * U(-spread, spread); DALI refuses empty ranges
        return centre if spread == 0 else centre + jitter * fn.random.uniform(range=[-spread, spread])

    bright, contrast, sat, hue = around(1.0, b), around(1.0, c), around(1.0, s), around(0.0, 360.0 * h)
    # torchvision: brightness, then contrast around the mean luminance, clamping to [0, 255]; i.e.
    # clamp(b * (luma + c * (x - luma))) with luma of the original crop. Plain arithmetic, so the
    # per-image luma can stay on the GPU (DALI wants named arguments on the CPU).
    luma = fn.reductions.mean(
        fn.color_space_conversion(crop, image_type=types.RGB, output_type=types.GRAY, device=device), device=device
    )
    xf = fn.cast(crop, dtype=types.FLOAT, device=device)
    xf = dmath.clamp(bright * (luma + contrast * (xf - luma)), 0.0, 255.0)
    x = fn.cast(xf, dtype=types.UINT8, device=device)
    gray = fn.random.coin_flip(probability=cfg.grayscale_p)
    x = fn.hsv(x, hue=hue, saturation=sat * (1.0 - gray), device=device)
    blur_on = fn.random.coin_flip(probability=cfg.blur_p[view])
    sigma = fn.random.uniform(range=list(cfg.blur_sigma))
    blurred = fn.gaussian_blur(x, sigma=sigma, window_size=cfg.blur_kernel, device=device)
    xf = fn.cast(x, dtype=types.FLOAT, device=device)
    xf = xf + blur_on * (fn.cast(blurred, dtype=types.FLOAT, device=device) - xf)
    if cfg.solarize_p[view] > 0:
        sol = fn.random.coin_flip(probability=cfg.solarize_p[view])
        xf = xf + sol * (xf >= float(cfg.solarize_threshold)) * (255.0 - 2.0 * xf)
    return fn.crop_mirror_normalize(
        xf,
        device=device,
        mirror=fn.random.coin_flip(probability=cfg.flip_p),
        mean=[m * 255.0 for m in cfg.mean],
        std=[s_ * 255.0 for s_ in cfg.std],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


def build_pipeline(
    source,
    cfg: AugmentConfig,
    *,
    batch_size: int,
    shard_id: int,
    num_shards: int,
    num_threads: int,
    seed: int,
    shuffle: bool,
    shuffle_buffer: int,
    device_id: int | None,
    order: list[int] | None = None,
):
    """The DALI pipeline producing (view1, view2, label); `device_id=None` is CPU-only mode.

    `order`: the units (shards or files) in the order to read them, the same on every rank (a
    per-epoch permutation); default: as listed.
    """
    fn, types = require_dali()
    from nvidia.dali import pipeline_def

    device = "cpu" if device_id is None else "gpu"
    order = list(range(len(source.counts))) if order is None else list(order)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def two_views():
        common = dict(
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=shuffle,
            initial_fill=max(shuffle_buffer, 1),
            pad_last_batch=True,
            name="Reader",
        )
        if source.kind == "shards":
            tars = [source.tars[i] for i in order]
            encoded, labels = fn.readers.webdataset(
                paths=[str(t) for t in tars],
                index_paths=[str(index_path(t)) for t in tars],
                ext=[";".join(IMAGE_EXTS), LABEL_BIN_EXT],
                dtypes=[types.UINT8, types.INT32],
                # Shards from other tools may lack the binary label: -1, as for unlabelled data.
                missing_component_behavior="empty",
                **common,
            )
            labels = fn.pad(labels, axes=[0], shape=[1], fill_value=-1)
        else:
            # The same file list as the torchvision path (not DALI's own directory scan).
            encoded, labels = fn.readers.file(
                files=[str(source.samples[i][0]) for i in order],
                labels=[source.samples[i][1] for i in order],
                **common,
            )
        images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        return _view(fn, types, images, cfg, 0, device), _view(fn, types, images, cfg, 1, device), labels

    return two_views()


def pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    """The DALI pipeline seed of `rank` in `epoch`: every random draw of the graph (reader shuffle,
    crop, jitter, grayscale, blur, solarize, flip) comes from it. It must differ between ranks: with
    (seed, epoch) alone the i-th sample of every rank gets the same augmentation. A pure function
    of its arguments, so a resumed epoch replays the same draws."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] % (2**31))


class DaliLoader(EpochLoader):
    """`(view1, view2, labels)` batches from DALI with the `TwoViewLoader` interface."""

    def __init__(
        self,
        source,
        cfg: AugmentConfig,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        num_threads: int = 2,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        device_id: int | None = None,
    ):
        require_dali()
        super().__init__()
        self.source, self.cfg = source, cfg
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.num_threads, self.seed, self.shuffle = num_threads, seed, shuffle
        self.shuffle_buffer, self.device_id = shuffle_buffer, device_id
        self.num_samples = int(sum(source.counts))
        self.batches_per_epoch = batches_per_rank(self.num_samples, world_size, batch_size)
        if device_id is None:
            log.info("DALI in CPU-only mode (no device_id): decoding and augmentation on %d CPU threads", num_threads)

    def _epoch_pipeline(self):
        pipe = build_pipeline(
            self.source,
            self.cfg,
            batch_size=self.batch_size,
            shard_id=self.rank,
            num_shards=self.world_size,
            num_threads=self.num_threads,
            seed=pipeline_seed(self.seed, self.epoch, self.rank),
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            device_id=self.device_id,
            order=epoch_order(len(self.source.counts), self.seed, self.epoch, self.shuffle),
        )
        pipe.build()
        return pipe

    def _epoch_batches(self) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        replay = self.batches_done
        pipe = self._epoch_pipeline()
        it = DALIGenericIterator(
            pipe, ["view1", "view2", "label"], reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP
        )
        try:
            for produced, out in enumerate(it):
                if produced >= len(self):
                    break
                if produced < replay:  # replaying up to a resumed position
                    continue
                batch = out[0]
                yield batch["view1"], batch["view2"], batch["label"].reshape(-1).long()
        finally:
            del it, pipe

    def state_dict(self) -> dict:
        epoch, done = self.position()
        return {
            "epoch": epoch,
            "batches_done": done,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "backend": "dali",
        }

    def load_state_dict(self, state: dict) -> None:
        layout = {k: v for k, v in self.state_dict().items() if k not in ("epoch", "batches_done")}
        check_resume_layout(state, layout)
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
