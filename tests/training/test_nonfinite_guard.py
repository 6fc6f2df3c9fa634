"""Non-finite guard (issue 10 §3): a NaN injected at each site stops training at that step with exit code 3,
one line naming the site and a remedy, and every earlier checkpoint and state intact."""
import hashlib
import json

import pytest
import torch

import train_network
from library.errors import NonFiniteError
from library.training.objective import diffusion_step
from library.training.loop import nonfinite_guard
from library.training.methods import network as network_method
from tests.training.train_helpers import base_args

BAD_STEP = 3


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _on_bad_step(fn):
    """Wrap ``fn`` so that its result is poisoned from the BAD_STEP-th call on."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        out = fn(*args, **kwargs)
        return out if calls["n"] < BAD_STEP else _poison(out)

    return wrapped


def _poison(out):
    if isinstance(out, torch.Tensor):
        return out * float("nan")
    out.context = out.context * float("nan")  # TextConditioning
    return out


def _inject(monkeypatch, site):
    if site == "VAE latents":
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        monkeypatch.setattr(DiagonalGaussianDistribution, "sample", _on_bad_step(DiagonalGaussianDistribution.sample))
    elif site == "text-encoder output":
        monkeypatch.setattr(network_method, "text_conditioning", _on_bad_step(network_method.text_conditioning))
    elif site == "U-Net output":
        monkeypatch.setattr(network_method, "call_unet", _on_bad_step(network_method.call_unet))
    elif site == "loss":
        monkeypatch.setattr(diffusion_step, "reduce_and_weight", _on_bad_step(diffusion_step.reduce_and_weight))
    else:  # a gradient: finite loss, NaN gradients through the U-Net output
        calls = {"n": 0}
        original = network_method.call_unet

        def call_unet(*args):
            calls["n"] += 1
            pred = original(*args)
            return _NanGrad.apply(pred) if calls["n"] >= BAD_STEP else pred

        monkeypatch.setattr(network_method, "call_unet", call_unet)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("site,expected", [
    # fp32 run: remedies that fit full precision (no --no_half_vae, no bf16; tests/faults covers fp16/bf16)
    ("VAE latents", "even in full precision"), ("text-encoder output", "text encoder's learning rate"),
    ("U-Net output", "--learning_rate"),
    ("loss", "--max_grad_norm"), ("gradient", "gradient of parameter group 'unet'"),
])
def test_nan_at_each_site_stops_with_code_3(tiny_sd, shapes_data, tmp_path, monkeypatch, capsys, site, expected):
    out = tmp_path / "out"
    argv = base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 5, "--save_every_n_steps", "1", "--save_state",
                     "--network_train_unet_only", *(["--check_grads"] if site == "gradient" else []))
    _inject(monkeypatch, site)
    with pytest.raises(SystemExit) as e:
        train_network.main(argv)
    assert e.value.code == 3
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: non-finite values") and f"at step {BAD_STEP}" in line and expected in line
    if site != "gradient":
        assert f"in the {site} at step" in line
    # the steps before stayed: their models and states, nothing of the bad step, no half-written folder
    names = sorted(p.name for p in out.iterdir())
    assert "lora-step00000002.safetensors" in names and "lora-step00000002-state" in names
    assert not any("00000003" in n or n.endswith(".saving") or n.startswith("lora.") for n in names)
    state = json.loads((out / "lora-step00000002-state" / "train_state.json").read_text())
    assert state["global_step"] == 2


def test_earlier_files_are_untouched(tiny_sd, shapes_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 5, "--save_every_n_steps", "2", "--save_state")
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "ref", 2,
                                 "--save_every_n_steps", "2", "--save_state"))
    _inject(monkeypatch, "loss")
    with pytest.raises(SystemExit):
        train_network.main(argv)
    before = _digest(tmp_path / "ref" / "lora-step00000002-state")
    after = _digest(out / "lora-step00000002-state")
    assert before.keys() == after.keys()
    assert before["model.safetensors"] == after["model.safetensors"]  # the same weights as a clean 2-step run


def test_first_site_in_pipeline_order_is_named():
    guard = nonfinite_guard.NonFiniteGuard()
    with guard.recording():
        nonfinite_guard.watch("U-Net output", torch.tensor([float("nan")]))
        nonfinite_guard.watch("VAE latents", torch.tensor([float("inf")]))
    with pytest.raises(NonFiniteError, match="in the VAE latents at step 7") as e:
        guard.check(torch.tensor(float("nan")), 7)
    assert e.value.exit_code == 3
    nonfinite_guard.watch("loss", torch.tensor([float("nan")]))  # outside a guarded forward: ignored
    assert guard.check(torch.tensor(1.5), 8) == (1.5, {})
