"""``--dataset_class package.module.Class``: a user's dataset in place of the folders / dataset config.

sd-scripts (``train_util.load_arbitrary_dataset``) imports the module, takes the class and builds it as
``Class(tokenizer, max_token_length, resolution, debug_dataset)``, where ``tokenizer`` is the model's
tokenizer (SD1/SD2) or the list of both (SDXL), and uses the object as its dataset group. Here:

* ``load_dataset_class`` imports it and ``check_dataset_class`` checks, before any model loads, that the
  class has what the loop calls (``REQUIRED_METHODS``; ``add_replacement`` for Textual Inversion) and takes
  those four arguments; each problem is one line naming the class.
* ``CustomDatasetGroup`` wraps the object for the shared loop. Item ``i`` is batch ``i`` of the epoch, a dict
  holding ``images`` (B, 3, H, W in [-1, 1]) or ``latents``, ``input_ids`` (B, 77) or (B, n, 77),
  ``input_ids2`` for SDXL, and ``captions``; ``loss_weights`` default to ones and SDXL's size conditioning
  to the batch's own size, uncropped. A batch missing a key is an error naming the class and the key.
* ``MinimalDataset`` is the base class users of sd-scripts derive from (``library.train_util`` re-exports
  it): the attributes upstream's metadata reads, ``get_input_ids`` and ``image_transforms``.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import random
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from library.data.batch import get_input_ids as tokenize
from library.data.dataset import WorkerFailure, step_of
from library.data.transforms import to_tensor
from library.errors import UserError

logger = logging.getLogger(__name__)

REQUIRED_METHODS = ("__len__", "__getitem__", "set_current_epoch")
TEXTUAL_INVERSION_METHODS = ("add_replacement",)


def load_dataset_class(path: str) -> type:
    """Import ``package.module.Class`` as upstream does (``importlib.import_module`` of the module part)."""
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise UserError(f"--dataset_class {path!r}: expected package.module.ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--dataset_class {path}: cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # the user's module raised while importing: say which module
        raise UserError(f"--dataset_class {path}: importing module {module_name!r} failed: "
                        f"{type(e).__name__}: {e}") from e
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserError(f"--dataset_class {path}: module {module_name!r} has no class {class_name!r}")
    return cls


def check_dataset_class(cls: type, path: str, textual_inversion: bool = False) -> None:
    """The methods the loop calls, and the constructor call upstream makes, or one line naming what is missing."""
    needed = REQUIRED_METHODS + (TEXTUAL_INVERSION_METHODS if textual_inversion else ())
    missing = [m for m in needed if not callable(getattr(cls, m, None))]
    if missing:
        raise UserError(f"--dataset_class {path}: class {cls.__name__} lacks method {', '.join(missing)} "
                        f"(needed: {', '.join(needed)})")
    try:
        inspect.signature(cls).bind("tokenizer", None, None, False)
    except TypeError as e:
        raise UserError(f"--dataset_class {path}: class {cls.__name__} cannot be built as "
                        f"{cls.__name__}(tokenizer, max_token_length, resolution, debug_dataset): {e}") from e
    except ValueError:  # no signature to inspect (a C type): the call itself will tell
        pass


def build_custom_group(path: str, tokenizers: Sequence, max_token_length: Optional[int],
                       resolution: Optional[tuple[int, int]], debug_dataset: bool) -> "CustomDatasetGroup":
    """Build the user's dataset with the model's tokenizer(s) (a list only for SDXL, as upstream)."""
    cls = load_dataset_class(path)
    tokenizer = list(tokenizers) if len(tokenizers) > 1 else tokenizers[0]
    try:
        dataset = cls(tokenizer, max_token_length, resolution, debug_dataset)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--dataset_class {path}: {cls.__name__}(...) failed: {type(e).__name__}: {e}") from e
    group = CustomDatasetGroup(dataset, path, len(tokenizers))
    if len(group) == 0:
        raise UserError(f"--dataset_class {path}: {cls.__name__} has no batches (len() is 0)")
    return group


class CustomDatasetGroup(Dataset):
    """The user's dataset as the loop sees a ``DatasetGroup``: batches checked and completed per item."""

    def __init__(self, dataset: Any, path: str, num_tokenizers: int) -> None:
        self.user = dataset
        self.datasets: list = []  # no folders or subsets: metadata describes the run from ``user``
        self.replacements: dict = {}  # the user's class applies Textual Inversion's own (``add_replacement``)
        self.path = path
        self.num_tokenizers = num_tokenizers
        self.tokenizers: list = []
        self.latent_factor = 8  # set from the VAE by the runner, as for DatasetGroup
        self._epoch = 0
        self._step_plan: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return type(self.user).__name__

    def __len__(self) -> int:
        return len(self.user)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        index, place = index if isinstance(index, tuple) else (index, None)
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range (0..{len(self) - 1})")
        try:
            if place is not None and self._step_plan is not None:
                self.set_current_step(step_of(self._step_plan, self._epoch, place))
            return self.complete(self.user[index])
        except UserError as e:
            if get_worker_info() is None:
                raise
            return WorkerFailure(e)  # as data: BatchLoader raises it in the main process

    def complete(self, batch: Any) -> dict:
        """Check one batch of the user's class and fill the keys upstream's trainers read with their defaults."""
        if not isinstance(batch, dict):
            raise UserError(f"--dataset_class {self.path}: {self.name}[i] must return a dict, not "
                            f"{type(batch).__name__}")
        pixels = batch.get("latents") if batch.get("latents") is not None else batch.get("images")
        if pixels is None:
            raise UserError(f"--dataset_class {self.path}: {self.name}[i] returned neither 'images' nor 'latents'")
        cached_text = batch.get("text_encoder_outputs1_list") is not None
        needed = ["captions"] + ([] if cached_text else ["input_ids"] + (["input_ids2"] if self.num_tokenizers > 1
                                                                          else []))
        missing = [k for k in needed if batch.get(k) is None]
        if missing:
            raise UserError(f"--dataset_class {self.path}: {self.name}[i] returned no {', '.join(map(repr, missing))}")
        out = dict(batch)
        size = len(pixels)
        for key in ("input_ids", "input_ids2"):
            if out.get(key) is not None and out[key].dim() == 2:
                out[key] = out[key].unsqueeze(1)  # (B, 77) -> (B, 1, 77): one 75-token chunk
        out.setdefault("input_ids2", None)
        if out.get("loss_weights") is None:
            out["loss_weights"] = torch.ones(size, dtype=torch.float32)
        factor = self.latent_factor if batch.get("latents") is not None else 1
        hw = torch.tensor([[pixels.shape[-2] * factor, pixels.shape[-1] * factor]] * size, dtype=torch.long)
        for key, value in (("original_sizes_hw", hw), ("crop_top_lefts", torch.zeros_like(hw)),
                           ("target_sizes_hw", hw)):
            if out.get(key) is None:
                out[key] = value
        return out

    # ---- what the loop and the runners call on a dataset group
    def set_current_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self.user.set_current_epoch(epoch)

    def set_step_plan(self, batches_per_epoch: int, grad_accum: int) -> None:
        self._step_plan = (batches_per_epoch, grad_accum)

    def set_current_step(self, step: int) -> None:
        if hasattr(self.user, "set_current_step"):
            self.user.set_current_step(step)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        if hasattr(self.user, "set_max_train_steps"):
            self.user.set_max_train_steps(max_train_steps)

    def verify_bucket_reso_steps(self, steps: int) -> None:
        if hasattr(self.user, "verify_bucket_reso_steps"):
            self.user.verify_bucket_reso_steps(steps)

    def add_replacement(self, source: str, target) -> None:
        self.user.add_replacement(source, target)

    def is_latent_cacheable(self) -> bool:
        return False  # a user's class cannot promise that an image's pixels repeat (the latent memo stays off)

    @property
    def num_train_images(self) -> int:
        return int(getattr(self.user, "num_train_images", 0))

    @property
    def num_reg_images(self) -> int:
        return int(getattr(self.user, "num_reg_images", 0))

    @property
    def batch_size(self) -> int:
        return int(getattr(self.user, "batch_size", 1))

    def image_infos(self):
        return iter(())


class MinimalDataset(Dataset):
    """Base class for a ``--dataset_class``: upstream's ``train_util.MinimalDataset`` attributes and helpers.

    Subclasses set ``num_train_images``, ``batch_size`` (and so on) and implement ``__len__`` (batches per
    epoch) and ``__getitem__`` (one batch dict, see the module doc).
    """

    def __init__(self, tokenizer, max_token_length: Optional[int], resolution: Optional[tuple[int, int]],
                 network_multiplier: float = 1.0, debug_dataset: bool = False) -> None:
        super().__init__()
        self.tokenizers = tokenizer if isinstance(tokenizer, list) else [tokenizer]
        self.max_token_length = max_token_length
        self.width, self.height = (None, None) if resolution is None else resolution
        self.network_multiplier = network_multiplier
        self.debug_dataset = debug_dataset
        self.current_epoch = 0
        self.current_step = 0
        self.max_train_steps = 0
        self.replacements: dict = {}
        self.rng = random.Random(0)  # template choice of ``replace_tokens`` unless the caller passes its own
        self.num_train_images = 0
        self.num_reg_images = 0
        self.batch_size = 1
        self.num_repeats = 1
        self.img_count = 1
        self.bucket_info: dict = {}
        self.is_reg = False
        self.image_dir = "dummy"  # for metadata, as upstream
        self.datasets = [self]
        self.subsets = [self]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        raise NotImplementedError

    def set_current_epoch(self, epoch: int) -> None:
        self.current_epoch = epoch

    def set_current_step(self, step: int) -> None:
        self.current_step = step

    def set_max_train_steps(self, max_train_steps: int) -> None:
        self.max_train_steps = max_train_steps

    def add_replacement(self, source: str, target) -> None:
        """Textual Inversion's token replacement; apply it with ``replace_tokens`` in ``__getitem__``."""
        self.replacements[source] = target

    def replace_tokens(self, caption: str, rng: Optional[random.Random] = None) -> str:
        """The caption with the replacements applied, as upstream's datasets do: a replacement of ``""`` is
        the whole caption (one of a list of templates, drawn with ``rng``), any other one a substring."""
        for source, target in self.replacements.items():
            if source == "":
                caption = (rng or self.rng).choice(target) if isinstance(target, (list, tuple)) else target
            else:
                caption = caption.replace(source, target if isinstance(target, str) else " ".join(target))
        return caption

    def verify_bucket_reso_steps(self, min_steps: int) -> None:
        pass

    def is_latent_cacheable(self) -> bool:
        return False

    def get_input_ids(self, caption: str, tokenizer=None) -> torch.Tensor:
        """Token ids (n, 77) of one caption, as the built-in datasets make them (``--max_token_length``)."""
        return tokenize(caption, tokenizer or self.tokenizers[0], self.max_token_length)

    @staticmethod
    def image_transforms(image) -> torch.Tensor:
        """A PIL image or (H, W, 3) uint8 array -> (3, H, W) float tensor in [-1, 1] (ToTensor, Normalize 0.5)."""
        return to_tensor(np.array(image.convert("RGB") if hasattr(image, "convert") else image))
