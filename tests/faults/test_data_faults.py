"""Bad images and captions fail before the work, as one ``error:`` line (issue 15 items 2, 3, 12).

Each case runs ``train_network.py`` in a subprocess, as a user would, on a tiny SD1 model: the run must
end with exit code 2 and exactly one ``error:`` line, no traceback, before the model loader logs
anything, and ``--dry_run`` (which never loads a model) must print the same line. An error raised in
a DataLoader worker must read the same with ``--max_data_loader_n_workers 2`` as with ``0``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.training.train_helpers import base_args, make_shapes_folder
from tools.make_tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
MODEL_LOADING = "loading SD1 checkpoint"  # library.models.loading's first log line


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    return write_tiny_model("sd1", tmp_path_factory.mktemp("data_faults"), formats=("safetensors",))["safetensors"]


@pytest.fixture
def data(tmp_path):
    """``data/1_sks shape/`` with four good 64x64 PNGs and their captions; returns the image folder."""
    make_shapes_folder(tmp_path / "data", repeats=1, n=4)
    return tmp_path / "data" / "1_sks shape"


def _train(model, folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = base_args(model, folder.parent, out, 8, "--train_batch_size", "1", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train_network.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    output = run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2, output
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def _fails_before_the_model(model, folder: Path, out: Path, *needles: str, extra: tuple = ()) -> str:
    """Real run and ``--dry_run``: exit 2, the same one line naming ``needles``, no model loaded, no output."""
    real = _train(model, folder, out, *extra)
    line = _one_error_line(real)
    assert MODEL_LOADING not in real.stderr + real.stdout
    assert not out.exists() or not any(out.iterdir())
    assert _one_error_line(_train(model, folder, out, "--dry_run", *extra)) == line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _save(path: Path, width: int, height: int) -> bytes:
    pixels = np.random.RandomState(width * 1000 + height).randint(0, 256, (height, width, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    return path.read_bytes()


def _corrupt_inside(path: Path) -> None:
    """A noise PNG with garbled compressed data mid-file: header and IEND intact, so only a decode can tell."""
    data = bytearray(_save(path, 64, 64))
    start = data.index(b"IDAT") + 100
    data[start:start + 50] = bytes(b ^ 0x5A for b in data[start:start + 50])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_image(tiny_sd1, data, tmp_path, ext):
    bad = data / f"cut.{ext}"
    full = _save(bad, 64, 64)
    bad.write_bytes(full[: len(full) // 2])  # the header still parses
    _fails_before_the_model(tiny_sd1, data, tmp_path / "out", "1 unreadable image", str(bad), "truncated")


def test_random_bytes_with_an_image_extension(tiny_sd1, data, tmp_path):
    bad = data / "noise.jpg"
    bad.write_bytes(np.random.RandomState(3).randint(0, 256, 5000).astype(np.uint8).tobytes())
    _fails_before_the_model(tiny_sd1, data, tmp_path / "out", str(bad), "cannot identify image file")


@pytest.mark.parametrize("size, why", [((1, 1), "too small"), ((96, 64), "too large")])
def test_image_that_cannot_fit_without_buckets(tiny_sd1, data, tmp_path, size, why):
    bad = data / "odd.png"
    _save(bad, *size)
    _fails_before_the_model(tiny_sd1, data, tmp_path / "out", "1 wrongly sized image", str(bad),
                            f"({size[0]}x{size[1]}, {why})", "without buckets an image must be 64x64")


def test_one_pixel_image_with_buckets_is_no_error(tiny_sd1, data, tmp_path):
    _save(data / "dot.png", 1, 1)
    run = _train(tiny_sd1, data, tmp_path / "out", "--enable_bucket", "--min_bucket_reso", "64",
                 "--max_bucket_reso", "128", "--dry_run")
    assert run.returncode == 0 and "error:" not in run.stderr, run.stderr


def test_bucket_no_upscale_names_the_image_too_small_for_a_bucket(tiny_sd1, data, tmp_path):
    bad = data / "dot.png"
    _save(bad, 1, 1)
    _fails_before_the_model(tiny_sd1, data, tmp_path / "out", "1 unbucketable image", f"{bad}: image size 1x1",
                            extra=("--enable_bucket", "--bucket_no_upscale", "--min_bucket_reso", "64"))


def test_whitespace_only_caption_is_a_warning_naming_the_file(tiny_sd1, data, tmp_path):
    (data / "1.caption").write_text("  \t \n", encoding="utf-8")
    run = _train(tiny_sd1, data, tmp_path / "out", "--dry_run")
    assert run.returncode == 0 and "error:" not in run.stderr, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "whitespace-only caption" in line]
    assert len(warnings) == 1 and str(data / "1.png") in warnings[0], run.stderr
    assert str(data / "0.png") not in warnings[0]


def test_verify_images_decodes_what_the_cheap_scan_cannot_see(tiny_sd1, data, tmp_path):
    _corrupt_inside(data / "2.png")
    _fails_before_the_model(tiny_sd1, data, tmp_path / "out", "1 unreadable image", str(data / "2.png"),
                            extra=("--verify_images",))


def test_worker_error_is_the_same_single_line_as_without_workers(tiny_sd1, data, tmp_path):
    _corrupt_inside(data / "2.png")  # passes the default scan; the decode in training fails
    lines = []
    for workers in ("0", "2"):
        run = _train(tiny_sd1, data, tmp_path / f"out{workers}", "--max_data_loader_n_workers", workers)
        lines.append(_one_error_line(run))
        assert "DataLoader worker" not in run.stderr
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"error: cannot read image {data / '2.png'}: "), lines[0]
