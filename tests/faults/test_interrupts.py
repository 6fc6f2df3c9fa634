"""Ctrl-C and SIGTERM (issue 15 item 6): one line, exit code 130 / 143, no traceback, nothing partial left;
with --save_state the first Ctrl-C saves a resumable state, and resuming from it is bit-identical.

Real signals: sent from the test to a child process once it printed that it reached the point under test,
or (in-process) sent by the test to its own process from a wrapped hook at a known step.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import gen_img
import train_network
from tests.faults.conftest import last_line, leftovers, run_main
from tests.training.train_helpers import base_args

STEPS = 6


@pytest.fixture
def sigint_default():
    """SIGINT as in a terminal (a test runner started in the background inherits it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _signal_after_step(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """The test sends ``signum`` to its own process right after optimizer step ``step``."""
    from library.training.loop import checkpointing

    original = checkpointing.Checkpointer.after_step

    def after_step(self, state):
        original(self, state)
        if state.global_step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(checkpointing.Checkpointer, "after_step", after_step)


def test_ctrl_c_with_save_state_saves_a_state_that_resumes_bit_identically(tiny_sd, shapes_data, tmp_path,
                                                                              monkeypatch, capsys, sigint_default):
    model = tiny_sd["sd1"]["safetensors"]
    common = ["--save_state", "--network_dropout", "0.1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_network.main(base_args(model, shapes_data, straight, STEPS, *common))
    with monkeypatch.context() as m:
        _signal_after_step(m, 3)
        code, err = run_main(train_network.main, base_args(model, shapes_data, stopped, STEPS, *common), capsys)
    state = stopped / "lora-step00000003-state"
    assert code == 130
    assert last_line(err) == f"interrupted at step 3/{STEPS}; last saved: {state}"
    assert json.loads((state / "train_state.json").read_text())["global_step"] == 3
    assert not (stopped / "lora.safetensors").exists() and leftovers(stopped) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run restored the handler
    # resume in a fresh folder: the final network equals the uninterrupted run's, tensor for tensor
    resumed = tmp_path / "resumed"
    train_network.main(base_args(model, shapes_data, resumed, STEPS, *common, "--resume", str(state)))
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_without_save_state_stops_at_once(tiny_sd, shapes_data, tmp_path, monkeypatch, capsys,
                                                 sigint_default):
    out = tmp_path / "out"
    _signal_after_step(monkeypatch, 2)
    code, err = run_main(train_network.main, base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, STEPS,
                                                       "--save_every_n_steps", "1"), capsys)
    assert code == 130
    assert last_line(err) == f"interrupted at step 2/{STEPS}; last saved: {out / 'lora-step00000002.safetensors'}"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora-step00000001.safetensors",
                                                                 "lora-step00000002.safetensors"]
    for p in out.glob("*.safetensors"):
        load_file(str(p))
    assert leftovers(out) == [] and not (out / ".lora.lock").exists()


def test_first_ctrl_c_in_a_child_saves_state_and_exits_130(tiny_sd, shapes_data, tmp_path, child):
    out = tmp_path / "out"
    c = child("step:2", "train_network", base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, STEPS,
                                                  "--save_state"))
    c.wait_for()
    c.send(signal.SIGINT)
    code, err = c.finish()
    state = out / "lora-step00000002-state"
    assert code == 130, err
    assert last_line(err) == f"interrupted at step 2/{STEPS}; last saved: {state}"
    assert json.loads((state / "train_state.json").read_text())["global_step"] == 2
    load_file(str(state / "model.safetensors"))
    assert leftovers(out) == [] and not (out / ".lora.lock").exists()


def test_second_ctrl_c_during_the_state_save_exits_at_once(tiny_sd, shapes_data, tmp_path, child):
    out = tmp_path / "out"
    c = child("step:2+state", "train_network", base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, STEPS,
                                                        "--save_state"))
    c.wait_for("PAUSED step 2")
    c.send(signal.SIGINT)  # first: the step is done, so the run starts saving its state
    c.wait_for("PAUSED in state save")  # accelerate has written the staging folder
    assert (out / "lora-step00000002-state.saving").is_dir()
    c.send(signal.SIGINT)  # second: stop now
    code, err = c.finish()
    assert code == 130, err
    assert last_line(err) == f"interrupted at step 2/{STEPS}; nothing saved yet"
    assert not out.exists()  # no staging folder, no lock: the run had saved nothing, so not even its folder


def test_sigterm_in_a_child_stops_at_once_with_143(tiny_sd, shapes_data, tmp_path, child):
    out = tmp_path / "out"
    c = child("step:2", "train_network", base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, STEPS,
                                                  "--save_state", "--save_every_n_steps", "1"))
    c.wait_for()
    c.send(signal.SIGTERM)  # SIGTERM never waits for a state save, --save_state or not
    code, err = c.finish()
    assert code == 143, err
    assert last_line(err) == f"interrupted at step 2/{STEPS}; last saved: {out / 'lora-step00000002-state'}"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "lora-step00000001-state", "lora-step00000001.run.json", "lora-step00000001.safetensors",
        "lora-step00000002-state", "lora-step00000002.run.json", "lora-step00000002.safetensors"]
    assert leftovers(out) == [] and not (out / ".lora.lock").exists()


@pytest.mark.parametrize("script,argv,signum", [
    ("convert_model", ["{model}", "{out}/converted.safetensors"], signal.SIGINT),
    ("networks.resize_lora", ["--model", "{lora}", "--save_to", "{out}/small.safetensors", "--new_rank", "2"],
     signal.SIGTERM),
])
def test_tools_interrupted_while_writing_leave_nothing(tiny_sd, tmp_path, child, script, argv, signum):
    """Signalled inside the atomic write (after the bytes went to the temporary): one line, no output file."""
    out = tmp_path / "out"
    out.mkdir()
    lora = _network_file(tiny_sd, tmp_path)
    argv = [a.format(model=tiny_sd["sd1"]["safetensors"], out=out, lora=lora) for a in argv]
    c = child("write", script, argv)
    c.wait_for()
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the signal comes mid-save
    c.send(signum)
    code, err = c.finish()
    assert code == 128 + signum, err
    assert last_line(err) == "interrupted"
    assert list(out.iterdir()) == []


def test_gen_img_ctrl_c_is_one_line(tiny_sd, tmp_path, monkeypatch, capsys, sigint_default):
    from library.sampling import pipeline

    def ctrl_c(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(pipeline.Pipeline, "generate", ctrl_c)
    out = tmp_path / "images"
    code, err = run_main(gen_img.main, ["--ckpt", tiny_sd["sd1"]["safetensors"], "--outdir", out, "--prompt", "a cat",
                                        "--W", "64", "--H", "64", "--steps", "2"], capsys)
    assert code == 130 and last_line(err) == "interrupted"
    assert not out.exists() or list(out.iterdir()) == []


def _network_file(tiny_sd, tmp_path) -> str:
    from library.models.loading import load_models
    from tests.networks.helpers import write_lora

    path = tmp_path / "net.safetensors"
    if not path.exists():
        write_lora(load_models(str(tiny_sd["sd1"]["safetensors"])), path)
    return str(path)

