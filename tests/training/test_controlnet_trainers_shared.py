"""The shared options in the ControlNet trainers (issue 20 items 3, 4): resume bit-identical, EMA, validation
loss, receipts, the non-finite guard and --dry_run behave as in the other trainers."""
from __future__ import annotations

import glob
import json
import re

import pytest
import torch

import sdxl_train_control_net_lllite
import train_controlnet
from tests.training.controlnet_helpers import make_pairs
from tests.training.full_train_helpers import common_args, nan_loss_from_call, weights

SCRIPTS = {"train_controlnet": (train_controlnet.main, "sd1", []),
           "sdxl_train_control_net_lllite": (sdxl_train_control_net_lllite.main, "sdxl",
                                             ["--cond_emb_dim", "8", "--network_dim", "16"])}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tools.make_tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("cn_models")
    return {fam: write_tiny_model(fam, root)["safetensors"] for fam in {f for _, f, _ in SCRIPTS.values()}}


def _run(script, models, tmp_path, out, steps, *extra):
    main, family, own = SCRIPTS[script]
    images, cond = make_pairs(tmp_path / "data", n=3)
    main(common_args(models[family], out, steps, "--train_data_dir", str(images), "--conditioning_data_dir", str(cond),
                     "--output_name", "m", "--learning_rate", "1e-3", *own, *extra))


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(glob.glob(str(logdir / "**" / "events.out.tfevents.*"), recursive=True)[0])
    ea.Reload()
    return set(ea.Tags()["scalars"])


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_resume_is_bit_identical(script, models, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--save_every_n_steps", "2", "--save_state", "--optimizer_type", "AdamW"]
    _run(script, models, tmp_path, a, 4, *common)
    _run(script, models, tmp_path, b, 4, *common, "--resume", str(a / "m-step00000002-state"))
    x, y = weights(a / "m.safetensors"), weights(b / "m.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    first = weights(a / "m-step00000002.safetensors")
    assert any(not torch.equal(first[k], x[k]) for k in x)  # it trained after the resume point


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_validation_ema_and_receipts(script, models, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    _run(script, models, tmp_path, out, 3, "--validation_split", "0.34", "--validate_every_n_steps", "1", "--ema",
         "--ema_decay", "0.5", "--logging_dir", str(logs))
    assert {"loss/validation", "ema/decay", "loss/current"} <= _scalars(logs)
    assert sorted(p.name for p in out.iterdir()) == ["m-ema.safetensors", "m.run.json", "m.safetensors"]
    model, ema = weights(out / "m.safetensors"), weights(out / "m-ema.safetensors")
    assert model.keys() == ema.keys() and any(not torch.equal(model[k], ema[k]) for k in model)
    receipt = json.loads((out / "m.run.json").read_text(encoding="utf-8"))
    assert receipt["script"] == script and receipt["steps"]["max_train_steps"] == 3


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_nan_loss_exits_3_keeping_the_last_good_file(script, models, tmp_path, monkeypatch, capsys):
    nan_loss_from_call(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:
        _run(script, models, tmp_path, tmp_path / "out", 3, "--save_every_n_steps", "1")
    assert e.value.code == 3 and "in the loss at step 2" in capsys.readouterr().err
    assert (tmp_path / "out" / "m-step00000001.safetensors").exists()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_dry_run_loads_nothing(script, models, tmp_path, capsys):
    out = tmp_path / "out"
    _run(script, models, tmp_path, out, 5, "--dry_run")
    text = capsys.readouterr().out
    assert re.search(r"^\s*total steps: 5$", text, re.M) and "controlnet" in text and not out.exists()
