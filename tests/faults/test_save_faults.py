"""Faults while saving (issue 15 item 5): disk full, file size limit, no permission, read-only file system.

Every case ends with exit code 2 and ONE line naming the file, what went wrong and (trainers) the last good
checkpoint; no temporary or ``*.saving`` folder is left, and every file saved before the fault still loads
(re-read with safetensors / torch, or resumed). Faults are made two ways without root: a real file size
limit (``RLIMIT_FSIZE`` in a child process, SIGXFSZ ignored so ``write()`` fails with EFBIG), and, for the
other error numbers, the writer replaced in-process by one that writes part of the file and then fails.
"""
from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import convert_model
import train_db
import train_network
from networks import extract_lora_from_models, merge_lora, resize_lora, sdxl_merge_lora, svd_merge_lora
from tests.faults.conftest import ROOT, error_line, leftovers, run_main
from tests.training.full_train_helpers import common_args
from tests.training.train_helpers import base_args

WORDS = {errno.ENOSPC: "no space left on device", errno.EACCES: "permission denied",
         errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}


def _half_write_then_fail(code: int, when=lambda path: True):
    """A writer that puts 100 bytes into ``path`` and then fails with ``code`` (once ``when(path)`` holds)."""
    def write(path):
        if not when(str(path)):
            return False
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(code, os.strerror(code), str(path))

    return write


def _failing_save_file(monkeypatch, code: int, fail_on_call: int):
    """safetensors.torch.save_file fails (half-written) on its ``fail_on_call``-th call."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, {"n": 0}
    half = _half_write_then_fail(code)

    def save_file(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            half(path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


# ------------------------------------------------------------------------------ training: model files

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EFBIG])
def test_failed_model_save_names_file_and_last_good_checkpoint(tiny_sd, shapes_data, tmp_path, monkeypatch,
                                                               capsys, code):
    out = tmp_path / "out"
    _failing_save_file(monkeypatch, code, fail_on_call=2)  # the step-2 save
    exit_code, err = run_main(train_network.main, base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 4,
                                                            "--save_every_n_steps", "1"), capsys)
    assert exit_code == 2
    assert error_line(err) == (f"error: cannot save {out / 'lora-step00000002.safetensors'}: {WORDS[code]}"
                               f"{_rest(code)}; last good checkpoint: {out / 'lora-step00000001.safetensors'}")
    assert sorted(p.name for p in out.iterdir()) == ["lora-step00000001.run.json", "lora-step00000001.safetensors"]
    assert any(k.endswith("lora_up.weight") for k in load_file(str(out / "lora-step00000001.safetensors")))


def _rest(code: int) -> str:
    """What follows the words for each error number (the file size limit explains itself)."""
    return {errno.ENOSPC: " (disk full)", errno.EFBIG: " (over the file size limit: see `ulimit -f`, or the file "
            "system's maximum)"}.get(code, "")


def test_failed_state_save_removes_the_staging_folder_and_the_earlier_state_resumes(tiny_sd, shapes_data, tmp_path,
                                                                                   monkeypatch, capsys):
    import accelerate.checkpointing

    out = tmp_path / "out"
    real, seen = accelerate.checkpointing.save, {"optimizer": 0}
    half = _half_write_then_fail(errno.ENOSPC)

    def save(obj, path, *a, **k):
        if os.path.basename(str(path)) == "optimizer.bin":
            seen["optimizer"] += 1
            if seen["optimizer"] == 2:
                half(path)
        return real(obj, path, *a, **k)

    model = tiny_sd["sd1"]["safetensors"]
    with monkeypatch.context() as m:
        m.setattr(accelerate.checkpointing, "save", save)
        code, err = run_main(train_network.main, base_args(model, shapes_data, out, 4, "--save_every_n_steps", "1",
                                                           "--save_state"), capsys)
    assert code == 2
    state1, state2 = out / "lora-step00000001-state", out / "lora-step00000002-state"
    assert error_line(err) == (f"error: cannot save {state2} (writing optimizer.bin): no space left on device "
                               f"(disk full); last good checkpoint: {out / 'lora-step00000002.safetensors'} "
                               f"(resumable state: {state1})")
    assert leftovers(out) == [] and not state2.exists()
    load_file(str(out / "lora-step00000002.safetensors"))
    resumed = tmp_path / "resumed"
    train_network.main(base_args(model, shapes_data, resumed, 2, "--resume", str(state1)))
    load_file(str(resumed / "lora.safetensors"))


def test_real_file_size_limit_in_the_state_save(tiny_sd, shapes_data, tmp_path):
    """RLIMIT_FSIZE between the network file (~0.5 MB) and the optimizer state (~1.1 MB): torch.save fails."""
    out = tmp_path / "out"
    limit = 800_000
    argv = base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 3, "--save_every_n_steps", "1", "--save_state")
    done = _run_limited([sys.executable, "train_network.py", *argv], limit)
    assert done.returncode == 2, done.stderr
    line = error_line(done.stderr)
    assert line.startswith(f"error: cannot save {out / 'lora-step00000001-state'}: file too large")
    assert f"the limit is {limit} bytes" in line
    assert line.endswith(f"; last good checkpoint: {out / 'lora-step00000001.safetensors'}")
    assert leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["lora-step00000001.run.json", "lora-step00000001.safetensors"]
    load_file(str(out / "lora-step00000001.safetensors"))


def _run_limited(argv: list, limit: int) -> subprocess.CompletedProcess:
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          preexec_fn=limit_file_size, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------ receipts, samples, Diffusers

def test_failed_receipt_names_it_and_the_model_saved_just_before(tiny_sd, shapes_data, tmp_path, monkeypatch,
                                                                 capsys):
    import builtins

    import library.fileio as fileio

    real_open = builtins.open
    half = _half_write_then_fail(errno.EROFS, when=lambda p: ".run.json." in os.path.basename(p))

    def fake_open(path, mode="r", *a, **k):
        if "w" in mode:
            half(path)  # fails for a receipt's temporary, passes everything else
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(fileio, "open", fake_open, raising=False)
    out = tmp_path / "out"
    code, err = run_main(train_network.main, base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2,
                                                       "--save_every_n_steps", "1"), capsys)
    model = out / "lora-step00000001.safetensors"
    assert code == 2
    assert error_line(err) == (f"error: cannot save {out / 'lora-step00000001.run.json'}: read-only file system; "
                               f"last good checkpoint: {model}")
    assert sorted(p.name for p in out.iterdir()) == [model.name]
    load_file(str(model))


def test_failed_sample_image_is_removed_and_named(tiny_sd, shapes_data, tmp_path, monkeypatch, capsys):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks shape --w 64 --h 64 --s 2\n", encoding="utf-8")
    real_save = Image.Image.save
    half = _half_write_then_fail(errno.ENOSPC, when=lambda p: os.sep + "sample" + os.sep in p)

    def save(self, fp, *a, **k):
        half(str(fp))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    code, err = run_main(train_network.main, base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 3,
                                                       "--save_every_n_steps", "1", "--sample_prompts", prompts,
                                                       "--sample_every_n_steps", "2"), capsys)
    assert code == 2
    line = error_line(err)
    assert re.fullmatch(rf"error: cannot save {re.escape(str(out / 'sample'))}/lora_000002_00_\d{{14}}\.png: no "
                        rf"space left on device \(disk full\); last good checkpoint: "
                        rf"{re.escape(str(out / 'lora-step00000001.safetensors'))}", line), line
    assert list((out / "sample").iterdir()) == []  # the half-written image is gone
    load_file(str(out / "lora-step00000001.safetensors"))


def test_failed_diffusers_folder_save_in_training(tiny_sd, shapes_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _failing_save_file(monkeypatch, errno.ENOSPC, fail_on_call=5)  # step 1: unet, vae, te (3); step 2: unet, vae
    argv = common_args(tiny_sd["sd1"]["safetensors"], out, 3, "--train_data_dir", shapes_data, "--output_name", "db",
                       "--save_model_as", "diffusers_safetensors", "--save_every_n_steps", "1")
    code, err = run_main(train_db.main, argv, capsys)
    assert code == 2
    assert error_line(err) == (f"error: cannot save {out / 'db-step00000002'} (writing vae/diffusion_pytorch_model."
                               f"safetensors): no space left on device (disk full); last good checkpoint: "
                               f"{out / 'db-step00000001'}")
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".run.json")) == ["db-step00000001"]
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(str(out / "db-step00000001" / "unet"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_made_read_only_during_training(tiny_sd, shapes_data, tmp_path, monkeypatch, capsys):
    from library.training.loop import checkpointing

    out = tmp_path / "out"
    original = checkpointing.Checkpointer.after_step

    def after_step(self, state):
        original(self, state)
        if state.global_step == 1:
            out.chmod(0o500)

    monkeypatch.setattr(checkpointing.Checkpointer, "after_step", after_step)
    try:
        code, err = run_main(train_network.main, base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2,
                                                           "--save_every_n_steps", "1"), capsys)
    finally:
        out.chmod(0o700)
    assert code == 2 and "permission denied" in error_line(err)
    assert error_line(err).endswith(f"last good checkpoint: {out / 'lora-step00000001.safetensors'}")


# ------------------------------------------------------------------------------ convert_model, LoRA tools

@pytest.mark.parametrize("target", ["conv.ckpt", "conv.safetensors", "conv-diffusers"])
def test_convert_model_under_a_real_file_size_limit(tiny_sd, tmp_path, target):
    out = tmp_path / "out"
    out.mkdir()
    done = _run_limited([sys.executable, "convert_model.py", tiny_sd["sd1"]["safetensors"], out / target,
                         *(["--use_safetensors"] if "diffusers" in target else [])], 5_000_000)
    assert done.returncode == 2, done.stderr
    assert error_line(done.stderr).startswith(f"error: cannot save {out / target}")
    assert "file too large" in error_line(done.stderr)
    assert list(out.iterdir()) == []


def test_convert_model_read_only_diffusers_folder_names_the_inner_file(tiny_sd, tmp_path, monkeypatch, capsys):
    _failing_save_file(monkeypatch, errno.EROFS, fail_on_call=2)
    out = tmp_path / "out"
    code, err = run_main(convert_model.main, [tiny_sd["sd1"]["safetensors"], out / "conv", "--use_safetensors"],
                         capsys)
    assert code == 2
    assert error_line(err) == (f"error: cannot save {out / 'conv'} (writing vae/diffusion_pytorch_model.safetensors)"
                               ": read-only file system")
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory):
    """Two SD1 networks, one SDXL network, and an original/tuned SD1 pair for extraction."""
    from library.models.saving import save_ldm_checkpoint
    from library.models.tiny import build_tiny_models
    from tests.networks.helpers import write_lora

    root = tmp_path_factory.mktemp("lora_inputs")
    sd1, sdxl = build_tiny_models("sd1", seed=0), build_tiny_models("sdxl", seed=0)
    paths = {"a": write_lora(sd1, root / "a.safetensors", seed=0), "b": write_lora(sd1, root / "b.safetensors", seed=1),
             "xl": write_lora(sdxl, root / "xl.safetensors", seed=2, metadata={"ss_base_model_version": "sdxl_base_v1-0"})}
    save_ldm_checkpoint(sd1, str(root / "org.safetensors"))
    with torch.no_grad():
        for p in sd1.unet.parameters():
            p.add_(0.01)
    save_ldm_checkpoint(sd1, str(root / "tuned.safetensors"))
    paths.update(org=str(root / "org.safetensors"), tuned=str(root / "tuned.safetensors"))
    return paths


@pytest.mark.parametrize("tool,argv", [
    (merge_lora, ["--models", "{a}", "{b}", "--ratios", "0.5", "0.5", "--save_to", "{out}"]),
    (sdxl_merge_lora, ["--models", "{xl}", "--ratios", "0.5", "--save_to", "{out}"]),
    (svd_merge_lora, ["--models", "{a}", "{b}", "--ratios", "0.5", "0.5", "--new_rank", "2", "--save_to", "{out}"]),
    (resize_lora, ["--model", "{a}", "--new_rank", "2", "--save_to", "{out}"]),
    (extract_lora_from_models, ["--model_org", "{org}", "--model_tuned", "{tuned}", "--dim", "2", "--save_to",
                                "{out}"]),
], ids=["merge_lora", "sdxl_merge_lora", "svd_merge_lora", "resize_lora", "extract_lora_from_models"])
def test_lora_tools_disk_full_is_one_line_and_leaves_nothing(lora_inputs, tmp_path, monkeypatch, capsys, tool, argv):
    out = tmp_path / "out" / "x.safetensors"
    _failing_save_file(monkeypatch, errno.ENOSPC, fail_on_call=1)
    code, err = run_main(tool.main, [a.format(out=out, **lora_inputs) for a in argv], capsys)
    assert code == 2
    assert error_line(err) == f"error: cannot save {out}: no space left on device (disk full)"
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
