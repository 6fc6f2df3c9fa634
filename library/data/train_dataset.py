"""One dataset of a run: its images, buckets, epoch order and the batch at an index.

spec dataset-config §4.3 (reg balancing), §7 (buckets, epochs), §11 (batch). Built by
``dataset_build.build_dataset``; ``dataset.DatasetGroup`` concatenates several of these.

Determinism: the batch at (epoch, index) is a pure function of the seed, the epoch and the index
(and of the step, only for token warmup). The batch order is rebuilt from (seed, epoch); every
sample draws its flip, crops, color_aug and caption choices from its own
``random.Random("<seed>/<dataset>/<epoch>/<index>/<position>")`` in sd-scripts' order. So batches do
not depend on DataLoader workers, on the fetch order or on resuming mid-epoch. (sd-scripts draws
from the global ``random``, so its batches depend on all of these.)
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from library.config.dataset_blueprint import DatasetParams, SubsetParams
from library.data.batch import Sample, cached_sample, collate, conditioning_image, get_input_ids, image_sample, \
    te_outputs_of
from library.data.buckets import BucketSet, Reso
from library.data.captions import CaptionOptions, process_caption
from library.data.image_info import ImageInfo
from library.data.repeats import EpochBatches

logger = logging.getLogger(__name__)


def caption_options(subset: SubsetParams) -> CaptionOptions:
    """The caption fields of a subset (spec dataset-config §8)."""
    return CaptionOptions(**{name: getattr(subset, name) for name in CaptionOptions.__dataclass_fields__})


@dataclass
class ItemContext:
    """What the group knows at fetch time and every dataset needs."""

    epoch: int
    step: int
    max_train_steps: int
    tokenizers: Sequence
    max_token_length: int | None
    replacements: Mapping[str, object] = field(default_factory=dict)
    debug: bool = False
    latent_factor: int = 8  # pixels per latent cell of the VAE in use


class TrainDataset:
    """Images of one ``[[datasets]]`` entry, bucketed, with batches that never mix buckets (§7.5)."""

    def __init__(self, params: DatasetParams, index: int, subsets: list[SubsetParams], img_counts: list[int],
                 images: list[ImageInfo], buckets: BucketSet, bucketed: bool, seed: int) -> None:
        self.params = params
        self.index = index
        self.subsets = subsets
        self.img_counts = img_counts  # images per subset, without repeats (metadata img_count)
        self.images = images
        self.buckets = buckets
        self.bucketed = bucketed
        self.seed = seed
        self.batches = EpochBatches(buckets.buckets, params.batch_size, seed)
        self.caption_opts = [caption_options(s) for s in subsets]
        self.tag_frequency: dict[str, dict[str, int]] = {}
        self.num_train_images = 0  # with repeats, before reg balancing (§4.3)
        self.num_reg_images = 0
        self.train_resolution_buckets = False  # fine-tuning buckets from train_resolution (§5)
        self.verified_paths: set[str] = set()  # headers already read during the build (scan "header")

    @property
    def style(self) -> str:
        return self.params.style

    @property
    def resolution(self) -> Reso | None:
        return self.params.resolution

    @property
    def with_alpha(self) -> bool:
        return any(s.alpha_mask for s in self.subsets)

    def __len__(self) -> int:
        return len(self.batches)

    def bucket_info(self) -> dict:
        """``{"buckets": {i: {"resolution", "count"}}, "mean_img_ar_error"}`` (§7.5)."""
        return self.buckets.bucket_info()

    def sync_epoch(self, epoch: int) -> None:
        """Bring the batch order to ``epoch``: forward by replaying shuffles, backward by rebuilding."""
        if epoch > self.batches.epoch:
            self.batches.set_epoch(epoch)
        elif epoch < self.batches.epoch:
            self.batches.load_state_dict({"seed": self.seed, "epoch": epoch})

    def image_indices(self, index: int) -> list[int]:
        """Positions in ``images`` of batch ``index`` at the current epoch."""
        return self.batches[index]

    def get_batch(self, index: int, ctx: ItemContext) -> dict:
        """The batch dictionary of spec §11 for batch ``index`` of epoch ``ctx.epoch``."""
        self.sync_epoch(ctx.epoch)
        positions = self.batches[index]
        samples = []
        for pos, image_index in enumerate(positions):
            rng = random.Random(f"{self.seed}/{self.index}/{ctx.epoch}/{index}/{pos}")
            samples.append(self.make_sample(self.images[image_index], rng, ctx))
        batch = collate(samples, self.params.network_multiplier, self.with_alpha, self.style == "controlnet",
                        len(ctx.tokenizers))
        if ctx.debug:
            batch["image_keys"] = [self.images[i].key for i in positions]
        return batch

    def make_sample(self, info: ImageInfo, rng: random.Random, ctx: ItemContext) -> Sample:
        """One sample, drawing in sd-scripts' order: flip, crop, color_aug, caption."""
        subset = self.subsets[info.subset]
        flipped = subset.flip_aug and rng.random() < 0.5
        if info.has_cached_latents:
            latents, alpha, original_size, crop_ltrb = cached_sample(info, flipped)
            image, target = None, (latents.shape[2] * ctx.latent_factor, latents.shape[1] * ctx.latent_factor)
        else:
            image, alpha, original_size, crop_ltrb = image_sample(info, subset, self.bucketed, self.resolution,
                                                                  flipped, rng)
            latents, target = None, (image.shape[2], image.shape[1])
        sample = Sample(info.caption, self.params.prior_loss_weight if info.is_reg else 1.0, flipped,
                        original_size, crop_ltrb, target, image=image, latents=latents, alpha_mask=alpha)
        if info.cond_path is not None:
            sample.cond_image = conditioning_image(info, target, flipped, self.bucketed)
        sample.te_outputs = te_outputs_of(info)
        if sample.te_outputs is None:  # cached TE outputs are of the raw caption: no processing (§8)
            sample.caption = process_caption(info.caption, self.caption_opts[info.subset], rng, epoch=ctx.epoch,
                                             step=ctx.step, max_train_steps=ctx.max_train_steps,
                                             replacements=ctx.replacements)
            sample.input_ids = [get_input_ids(sample.caption, tok, ctx.max_token_length) for tok in ctx.tokenizers]
        return sample
