"""EMA (issue 10 §2): the recurrence against diffusers' EMAModel, saving, and exact resume."""
import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.errors import UserError
from library.training.extras.ema import EMA
from tests.training.train_helpers import base_args


def _toy_updates(steps: int):
    """A toy model and a fixed sequence of parameter values (what an optimizer would produce)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, [[torch.randn_like(p) for p in model.parameters()] for _ in range(steps)]


@pytest.mark.parametrize("power,after", [(None, 0), (None, 3), (2 / 3, 0), (0.75, 2)])
def test_ema_equals_diffusers_emamodel(power, after):
    model, updates = _toy_updates(12)
    ours = EMA(list(model.parameters()), decay=0.9, update_after_step=after, power=power)
    oracle = EMAModel(model.parameters(), decay=0.9, update_after_step=after, use_ema_warmup=power is not None,
                      power=power if power is not None else 2 / 3, inv_gamma=1.0)
    for step, values in enumerate(updates, start=1):
        with torch.no_grad():
            for p, v in zip(model.parameters(), values):
                p.copy_(v)
        ours.after_step(step)
        oracle.step(model.parameters())
        for mine, theirs in zip(ours.shadow, oracle.shadow_params):
            assert torch.equal(mine, theirs), step


def test_ema_closed_form_with_every_n_steps_and_cpu():
    """decay(n) = min(d, (1+s)/(10+s)), s = n - 1; updates only every 2nd step; shadow on the CPU."""
    p = torch.nn.Parameter(torch.zeros(()))
    ema = EMA([p], decay=0.5, every_n_steps=2, device=torch.device("cpu"))
    expected = 0.0
    for step in range(1, 9):
        with torch.no_grad():
            p.fill_(float(step))
        ema.after_step(step)
        if step % 2 == 0:
            s = step - 1
            d = min(0.5, (1 + s) / (10 + s))
            expected = expected - (1 - d) * (expected - step)
        assert ema.shadow[0].item() == pytest.approx(expected, abs=1e-6)
    with ema.applied():
        assert p.item() == pytest.approx(expected, abs=1e-6)
    assert p.item() == 8.0  # restored after the swap


def test_ema_options_are_checked():
    with pytest.raises(UserError, match="--ema_decay"):
        EMA([], decay=1.5)
    with pytest.raises(UserError, match="--ema_every_n_steps"):
        EMA([], every_n_steps=0)


def test_ema_files_and_resume_continue_exactly(tiny_sd, shapes_data, tmp_path):
    """4 straight steps == 2 steps + state + resume + 2 steps, for the model and for its EMA."""
    common = ["--ema", "--ema_decay", "0.8", "--save_every_n_steps", "2", "--save_state"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    model = tiny_sd["sd1"]["safetensors"]
    train_network.main(base_args(model, shapes_data, straight, 4, *common))
    state = straight / "lora-step00000002-state"
    assert (state / "ema.safetensors").exists()
    train_network.main(base_args(model, shapes_data, resumed, 4, *common, "--resume", str(state)))
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the EMA file sits beside each model, with the model's metadata keys, and differs from the model
    assert (straight / "lora-step00000002-ema.safetensors").exists()
    with safe_open(str(straight / "lora.safetensors"), "pt") as f, \
            safe_open(str(straight / "lora-ema.safetensors"), "pt") as g:
        assert f.metadata().keys() == g.metadata().keys()
        assert f.metadata()["ss_network_dim"] == g.metadata()["ss_network_dim"]
        assert any(not torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def test_sample_with_ema_needs_ema(tiny_sd, shapes_data, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path, 1, "--sample_with_ema"))
    assert e.value.code == 2
