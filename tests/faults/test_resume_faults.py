"""Resume messages (issue 15 item 9): a state of another network size names the tensor and both shapes, a
damaged train_state.json is one line, a missing RNG state is an error unless --resume_inexact; and the
non-finite guard's remedy fits the precision in use."""
from __future__ import annotations

import argparse
import shutil

import pytest
import torch
from safetensors import safe_open

import train_network
from library.errors import NonFiniteError
from library.training.loop.nonfinite_guard import NonFiniteGuard
from library.training.settings.from_options import remedies
from tests.faults.conftest import error_line, run_main
from tests.training.train_helpers import base_args


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, tiny_sd):
    """A 2-step run's state folder (network_dim 4) and the data it trained on."""
    from tests.training.train_helpers import make_shapes_folder

    root = tmp_path_factory.mktemp("resume_faults")
    data = make_shapes_folder(root / "data", repeats=2, n=3)
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], data, root / "out", 2, "--save_state"))
    return root / "out" / "lora-state", data


def _copy(state, tmp_path):
    return shutil.copytree(state, tmp_path / "state")


def _resume(tiny_sd, data, tmp_path, state, capsys, *extra):
    argv = base_args(tiny_sd["sd1"]["safetensors"], data, tmp_path / "out", 4, "--resume", state, *extra)
    return run_main(train_network.main, argv, capsys)


def test_other_network_dim_names_the_tensor_and_both_shapes(tiny_sd, saved_state, tmp_path, capsys):
    state, data = saved_state
    code, err = _resume(tiny_sd, data, tmp_path, state, capsys, "--network_dim", "8")
    assert code == 2
    line = error_line(err)
    with safe_open(str(state / "model.safetensors"), "pt") as f:  # the oracle: the file's own header
        key = sorted(k for k in f.keys() if list(f.get_slice(k).get_shape()) != [])[0]
        saved = list(f.get_slice(key).get_shape())
    now = [8, *saved[1:]] if key.endswith("lora_down.weight") else [saved[0], 8, *saved[2:]]  # the rank's axis
    assert line == (f"error: --resume {state}: tensor {key} has shape {saved} in the state but {now} in this run "
                    "(the state was saved with other network settings, e.g. another --network_dim)")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.parametrize("content", ['{"global_step": 2, "epo', "", '["not", "an", "object"]', '{"epoch": 1}',
                                     '{"global_step": "two", "epoch": 0}'])
def test_damaged_train_state_is_one_line(tiny_sd, saved_state, tmp_path, capsys, content):
    state, data = saved_state
    copy = _copy(state, tmp_path)
    (copy / "train_state.json").write_text(content, encoding="utf-8")
    code, err = _resume(tiny_sd, data, tmp_path, copy, capsys)
    assert code == 2
    line = error_line(err)
    assert line.startswith(f"error: --resume {copy}: train_state.json is damaged (")
    assert line.endswith("resume from another state folder")


def test_missing_rng_state_is_an_error_unless_resume_inexact(tiny_sd, saved_state, tmp_path, capsys, caplog):
    state, data = saved_state
    copy = _copy(state, tmp_path)
    (copy / "random_states_0.pkl").unlink()
    code, err = _resume(tiny_sd, data, tmp_path, copy, capsys)
    assert code == 2
    assert error_line(err) == (f"error: --resume {copy}: random_states_0.pkl is missing, so the random number "
                               "generators cannot be restored and the run would not continue exactly as it would "
                               "have; add --resume_inexact to resume anyway")
    caplog.set_level("WARNING")
    code, err = _resume(tiny_sd, data, tmp_path, copy, capsys, "--resume_inexact")
    assert code == 0, err
    assert "--resume_inexact" in caplog.text and "NOT restored" in caplog.text
    assert (tmp_path / "out" / "lora.safetensors").exists()


# ------------------------------------------------------------------------------ non-finite remedies

def _args(mixed_precision="no", **kw):
    base = dict(mixed_precision=mixed_precision, full_fp16=False, full_bf16=False, no_half_vae=False,
                max_grad_norm=1.0)
    return argparse.Namespace(**{**base, **kw})


def _raise_at(site: str, args) -> str:
    guard = NonFiniteGuard(remedies=remedies(args))
    with guard.recording():
        from library.training.loop.nonfinite_guard import watch

        watch(site, torch.tensor([float("nan")]))
    with pytest.raises(NonFiniteError) as e:
        guard.check(torch.tensor(float("nan")), 5)
    return str(e.value)


@pytest.mark.parametrize("args,site,present,absent", [
    (_args("fp16"), "U-Net output", ["--mixed_precision bf16 instead of fp16", "fp16 overflowed"], []),
    (_args("bf16"), "U-Net output", ["lower --learning_rate or --max_grad_norm (now 1)"], ["bf16", "fp16"]),
    (_args("no"), "loss", ["lower --learning_rate"], ["bf16", "fp16"]),
    (_args("no", max_grad_norm=0.0), "loss", ["clip gradients (--max_grad_norm 1.0)"], []),
    (_args("bf16", full_bf16=True), "loss", ["drop --full_bf16"], ["instead of fp16"]),
    (_args("fp16"), "VAE latents", ["--no_half_vae", "fixed for fp16"], []),
    (_args("bf16"), "VAE latents", ["--no_half_vae"], ["fp16"]),
    (_args("fp16", no_half_vae=True), "VAE latents", ["even in full precision"], ["use --no_half_vae"]),
    (_args("no"), "VAE latents", ["even in full precision"], ["use --no_half_vae"]),
    (_args("bf16"), "text-encoder output", ["text encoder's learning rate"], ["bf16"]),
    (_args("fp16"), "text-encoder output", ["instead of fp16"], []),
])
def test_remedy_fits_the_precision(args, site, present, absent):
    message = _raise_at(site, args)
    assert f"in the {site} at step 5" in message
    for text in present:
        assert text in message, (text, message)
    for text in absent:
        assert text not in message.split(": ", 1)[1].split(". Training stopped")[0], (text, message)


def test_gradient_remedy_names_the_group_and_fits_the_precision():
    guard = NonFiniteGuard(check_grads=True, remedies=remedies(_args("bf16")))
    with pytest.raises(NonFiniteError) as e:
        guard.check(torch.tensor(1.0), 3, [torch.tensor(float("inf"))], ["unet"])
    assert "lower the learning rate of 'unet', or lower --max_grad_norm (now 1)" in str(e.value)
    assert "bf16" not in str(e.value)
