"""The features beyond sd-scripts in train_db.py and train_textual_inversion.py (issue 10 §1-§5):
dry run, validation loss, EMA files with resume state, receipts, non-finite guard."""
import glob
import re

import pytest
import torch

import train_db
import train_textual_inversion
from library.training.objective import diffusion_step
from tests.training.full_train_helpers import common_args, weights


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(glob.glob(str(logdir / "**" / "events.out.tfevents.*"), recursive=True)[0])
    ea.Reload()
    return ea.Tags()["scalars"]


def _db(model, data, out, steps, *extra):
    return common_args(model, out, steps, "--train_data_dir", str(data), "--output_name", "db",
                       "--learning_rate", "1e-4", "--save_model_as", "safetensors", *extra)


def _ti(model, data, out, steps, *extra):
    return common_args(model, out, steps, "--train_data_dir", str(data), "--token_string", "sks",
                       "--init_word", "shape", "--learning_rate", "1e-2", *extra)


@pytest.mark.parametrize("main,make", [(train_db.main, _db), (train_textual_inversion.main, _ti)])
def test_dry_run_exits_0_without_output(tiny_sd, shapes_data, tmp_path, capsys, main, make):
    out = tmp_path / "out"
    main(make(tiny_sd["sd1"]["safetensors"], shapes_data, out, 5, "--dry_run", "--gradient_accumulation_steps", "2"))
    text = capsys.readouterr().out
    assert re.search(r"^\s*total steps: 5$", text, re.M) and re.search(r"^\s*steps per epoch: 3$", text, re.M)
    assert "estimated peak" in text and not out.exists()


def test_train_db_validation_ema_and_receipts(tiny_sd, shapes_data, tmp_path):
    out = tmp_path / "out"
    train_db.main(_db(tiny_sd["sd1"]["safetensors"], shapes_data, out, 3, "--validation_split", "0.34",
                      "--validate_every_n_steps", "1", "--ema", "--ema_decay", "0.5", "--ema_device", "cpu",
                      "--logging_dir", str(tmp_path / "logs")))
    assert {"loss/validation", "loss/validation_t0-199", "ema/decay"} <= set(_scalars(tmp_path / "logs"))
    assert sorted(p.name for p in out.iterdir()) == ["db-ema.safetensors", "db.run.json", "db.safetensors"]
    model, ema = weights(out / "db.safetensors"), weights(out / "db-ema.safetensors")
    assert model.keys() == ema.keys() and any(not torch.equal(model[k], ema[k]) for k in model)


def test_ti_ema_state_resumes_exactly(tiny_sd, shapes_data, tmp_path):
    common = ["--ema", "--ema_decay", "0.7", "--save_every_n_steps", "2", "--save_state",
              "--save_model_as", "safetensors"]
    a, b = tmp_path / "a", tmp_path / "b"
    train_textual_inversion.main(_ti(tiny_sd["sd1"]["safetensors"], shapes_data, a, 4, *common))
    train_textual_inversion.main(_ti(tiny_sd["sd1"]["safetensors"], shapes_data, b, 4, *common,
                                     "--resume", str(a / "sks-step00000002-state")))
    for name in ("sks.safetensors", "sks-ema.safetensors"):
        x, y = weights(a / name), weights(b / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name


def test_train_db_nan_loss_exits_3(tiny_sd, shapes_data, tmp_path, monkeypatch, capsys):
    original = diffusion_step.reduce_and_weight
    calls = {"n": 0}

    def nan_from_step_2(*args):
        calls["n"] += 1
        loss = original(*args)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(diffusion_step, "reduce_and_weight", nan_from_step_2)
    with pytest.raises(SystemExit) as e:
        train_db.main(_db(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "out", 3, "--save_every_n_steps", "1"))
    assert e.value.code == 3
    assert "in the loss at step 2" in capsys.readouterr().err
    assert (tmp_path / "out" / "db-step00000001.safetensors").exists()
