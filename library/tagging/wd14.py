"""WD14 tagger model: files, label CSV, ONNX Runtime session and image preprocessing (spec utilities §2).

Only the ONNX backend exists here (sd-scripts' TensorFlow/Keras path needs TensorFlow, which this
project does not depend on). v2 and v3 repos differ only by their files, so both load the same way.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from library.errors import UserError
from library.tagging.tag_rules import Labels

logger = logging.getLogger(__name__)

DEFAULT_WD14_TAGGER_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
MODEL_FILE = "model.onnx"
CSV_FILE = "selected_tags.csv"
DEFAULT_IMAGE_SIZE = 448  # used when the ONNX input does not state its size

RATING, GENERAL, CHARACTER = "9", "0", "4"  # CSV categories, compared as strings


def model_location(model_dir: str, repo_id: str) -> Path:
    """`<model_dir>/<repo_id with "/" → "_">`: one sub-folder per repo."""
    return Path(model_dir) / repo_id.replace("/", "_")


def _missing_files_message(location: Path, repo_id: str, reason: str) -> str:
    return (f"WD14 tagger model not available ({reason}): put {MODEL_FILE} and {CSV_FILE} from "
            f"https://huggingface.co/{repo_id} into {location}")


def ensure_model_files(model_dir: str, repo_id: str, force_download: bool = False) -> Path:
    """Return the model folder, downloading `model.onnx` + `selected_tags.csv` when needed.

    As sd-scripts: download when the sub-folder is missing or with `--force_download`. Unlike it, an
    offline session (HF_HUB_OFFLINE set) or missing huggingface_hub gives one UserError saying where
    to put the two files, and a folder lacking either file is reported instead of crashing later.
    """
    location = model_location(model_dir, repo_id)
    if force_download or not location.exists():
        _download(location, repo_id)
    else:
        logger.info(f"using existing wd14 tagger model: {location}")
    missing = [name for name in (MODEL_FILE, CSV_FILE) if not (location / name).is_file()]
    if missing:
        raise UserError(_missing_files_message(location, repo_id, f"{', '.join(missing)} missing")
                        + " (or rerun online with --force_download)")
    return location


def _download(location: Path, repo_id: str) -> None:
    """Fetch the two ONNX-backend files from the hub into ``location``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
        raise UserError(_missing_files_message(location, repo_id, "HF_HUB_OFFLINE is set, no download"))
    try:
        from huggingface_hub import hf_hub_download  # optional package
    except ImportError as e:
        raise UserError(_missing_files_message(location, repo_id, "huggingface_hub is not installed")) from e
    logger.info(f"downloading wd14 tagger model from hf_hub. id: {repo_id}")
    location.mkdir(parents=True, exist_ok=True)
    for name in (CSV_FILE, MODEL_FILE):
        try:
            # local_dir avoids the symlinked cache layout (sd-scripts' force_filename workaround)
            hf_hub_download(repo_id, name, local_dir=str(location), force_download=True)
        except Exception as e:  # network, auth, missing repo: all fixable by the user
            raise UserError(_missing_files_message(location, repo_id, f"download of {name} failed: {e}")) from e


def load_labels(csv_path: Path) -> Labels:
    """Read `selected_tags.csv` (header `tag_id,name,category,…`) into rating/general/character lists."""
    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise UserError(f"unexpected csv format in {csv_path}: header {rows[0] if rows else '(empty)'}, "
                        f"expected tag_id,name,category,count")
    body = rows[1:]
    return Labels(rating=[r[1] for r in body if r[2] == RATING],
                  general=[r[1] for r in body if r[2] == GENERAL],
                  character=[r[1] for r in body if r[2] == CHARACTER])


def _select_providers(available: list[str]) -> tuple[list[str], list[dict] | None]:
    """OpenVINO (GPU_FP32; fp16 gives nonsense) if available, else CUDA, else ROCm, else CPU."""
    if "OpenVINOExecutionProvider" in available:
        return ["OpenVINOExecutionProvider"], [{"device_type": "GPU_FP32"}]
    for name in ("CUDAExecutionProvider", "ROCMExecutionProvider"):
        if name in available:
            return [name], None
    return ["CPUExecutionProvider"], None


class Wd14Tagger:
    """An ONNX Runtime session plus what the caller needs to feed it: input size and batch size."""

    def __init__(self, onnx_path: Path, batch_size: int):
        import onnxruntime as ort  # optional package

        providers, options = _select_providers(ort.get_available_providers())
        logger.info(f"loading onnx model: {onnx_path} ({providers[0]})")
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=providers, provider_options=options)
        except Exception as e:  # corrupt or truncated file
            raise UserError(f"cannot load ONNX model {onnx_path}: {e}") from e
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = list(model_input.shape)
        size = shape[1] if len(shape) == 4 else None
        self.image_size = size if isinstance(size, int) and size > 0 else DEFAULT_IMAGE_SIZE
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        self.batch_size = batch_size
        if self.fixed_batch is not None and self.fixed_batch != batch_size:
            logger.warning(f"Batch size {batch_size} doesn't match onnx model batch size {self.fixed_batch}, "
                           f"use model batch size {self.fixed_batch}")
            self.batch_size = self.fixed_batch

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities `[n, labels]` for an NHWC float32 batch of n ≤ batch_size images."""
        n = len(images)
        if self.fixed_batch is not None and n < self.fixed_batch:
            # a fixed-batch model cannot take a short last batch: pad with zeros, drop their outputs
            pad = np.zeros((self.fixed_batch - n, *images.shape[1:]), dtype=images.dtype)
            images = np.concatenate([images, pad])
        return np.asarray(self.session.run(None, {self.input_name: images})[0])[:n]


def preprocess_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB → BGR, white square padding centred, resize to `size`², float32 0-255 HWC (spec §2).

    Shrinking uses Pillow BOX (OpenCV INTER_AREA's equivalent), enlarging LANCZOS (sd-scripts: LANCZOS4).
    Padding and resizing act on each channel alike, so they run on the RGB image before the flip.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    side = max(w, h)
    if (w, h) != (side, side):
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    if side > size:
        image = image.resize((size, size), Image.Resampling.BOX)
    elif side < size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image)[:, :, ::-1].astype(np.float32)
