"""Command-line mistakes and out-of-range numbers in the non-training scripts: one ``error:`` line, exit 2
(issue 15 items 4 and 9). Scripts run as subprocesses, as a user runs them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize("argv,needles", [
    (["train_network.py", "--network_dim", "x"], ["argument --network_dim: invalid int value: 'x'",
                                                  "see train_network.py --help"]),
    (["train_network.py", "--no_such_option"], ["unrecognized arguments: --no_such_option"]),
    (["train_db.py", "--mixed_precision", "fp32"], ["argument --mixed_precision: invalid choice: 'fp32'"]),
    (["gen_img.py", "--steps", "many"], ["argument --steps: invalid int value", "see gen_img.py --help"]),
    (["convert_model.py"], ["the following arguments are required: model_to_load, model_to_save"]),
    (["networks/merge_lora.py", "--nope"], ["unrecognized arguments: --nope", "see merge_lora.py --help"]),
    (["finetune/tag_images_by_wd14_tagger.py", "--batch_size", "x"], ["invalid int value"]),
])
def test_argparse_errors_are_one_line(argv, needles):
    line = _one_error_line(_run(*argv))
    for needle in needles:
        assert needle in line, line


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    from tools.make_tiny_model import write_tiny_model

    return write_tiny_model("sd1", tmp_path_factory.mktemp("gen_ranges"), formats=("safetensors",))["safetensors"]


@pytest.mark.parametrize("extra,needles", [
    (["--steps", "0"], ["--steps 0 is out of range: it must be from 1 to 1000"]),
    (["--steps", "-3"], ["--steps -3 is out of range"]),
    (["--W", "0"], ["--W 0 is out of range: it must be >= 8"]),
    (["--batch_size", "0"], ["--batch_size 0 is out of range"]),
    (["--strength", "1.5", "--sampler", "ddim"], ["--strength 1.5 is out of range: it must be from 0 to 1"]),
    (["--seed", "-1"], ["--seed -1 is out of range"]),
    (["--prompt", "a cat --w 0"], ["prompt option --w 0 is out of range: it must be >= 8 (as --W): a cat --w 0"]),
    (["--prompt", "a cat --t 2"], ["prompt option --t 2.0 is out of range", "(as --strength)"]),
    (["--prompt", "a cat --glr 3", "--sampler", "euler_a"], ["prompt option --glr 3.0 is out of range"]),
])
def test_gen_img_ranges_before_any_model_loads(tiny_sd1, tmp_path, extra, needles):
    argv = ["gen_img.py", "--ckpt", str(tiny_sd1), "--outdir", str(tmp_path / "o")]
    if "--prompt" not in extra:
        argv += ["--prompt", "a cat"]
    line = _one_error_line(_run(*argv, *extra))
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "o").exists()  # nothing generated, nothing created


def test_gen_img_disk_full_leaves_no_partial_image(tiny_sd1, tmp_path, monkeypatch, capsys):
    """The image is written to a temporary name and renamed: a write that fails half-way (disk full) is one
    line naming the image, and no file is left behind."""
    import errno

    from PIL import Image

    import gen_img

    real_save = Image.Image.save

    def half_then_full(self, fp, *a, **k):
        real_save(self, fp, *a, **k)
        with open(fp, "r+b") as f:  # what a full disk leaves: a cut file
            f.truncate(os.path.getsize(fp) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_full)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        gen_img.main(["--ckpt", str(tiny_sd1), "--outdir", str(out), "--prompt", "a cat", "--W", "64", "--H", "64",
                      "--steps", "2"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "no space left on device" in errors[0] and str(out) in errors[0]
    assert list(out.iterdir()) == []
