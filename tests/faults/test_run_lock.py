"""One run per output name (issue 15 item 7): a live run's lock stops a second run (and its --dry_run) with
exit code 2 naming the other process before any model loads; a killed run's lock is stale and does not block;
the lock is removed when a run ends; the temporaries a killed run left are cleaned at the next start."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import train_network
from library.errors import UserError
from library.training.runners import run_lock
from tests.faults.conftest import error_line, run_main
from tests.training.train_helpers import base_args


@pytest.fixture
def other_process():
    """A live process that is not this one (its pid goes into a lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def tripwire(monkeypatch):
    import library.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded although another run holds the lock")

    monkeypatch.setattr(loading, "load_models", boom)


def _write_lock(out, pid: int, host: str | None = None, started: float = 1_700_000_000.0, process_start=None):
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lora.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": started,
                                "process_start": process_start}))
    return lock


def _when(started: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))


@pytest.mark.parametrize("dry_run", [False, True])
def test_live_lock_stops_the_run_before_models_load(tiny_sd, shapes_data, tmp_path, capsys, tripwire, other_process,
                                                    dry_run):
    out = tmp_path / "out"
    lock = _write_lock(out, other_process.pid)
    argv = base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2, *(["--dry_run"] if dry_run else []))
    code, err = run_main(train_network.main, argv, capsys)
    assert code == 2
    line = error_line(err)
    assert f"pid {other_process.pid} on {socket.gethostname()}, started {_when(1_700_000_000.0)}" in line
    assert str(lock) in line and "--output_name" in line
    assert json.loads(lock.read_text())["pid"] == other_process.pid  # the other run's lock is untouched


@pytest.mark.parametrize("script,extra", [
    ("train_db", []),
    ("train_textual_inversion", ["--token_string", "sks", "--init_word", "shape", "--output_name", "lora"]),
])
def test_every_trainer_checks_the_lock(tiny_sd, shapes_data, tmp_path, capsys, tripwire, other_process, script,
                                       extra):
    from tests.training.full_train_helpers import common_args

    out = tmp_path / "out"
    _write_lock(out, other_process.pid)
    main = __import__(script).main
    argv = common_args(tiny_sd["sd1"]["safetensors"], out, 2, "--train_data_dir", shapes_data, "--output_name",
                       "lora", *extra)
    for dry_run in ([], ["--dry_run"]):
        code, err = run_main(main, [*argv, *dry_run], capsys)
        assert code == 2 and f"pid {other_process.pid} on " in error_line(err)


def test_lock_on_another_host_is_taken_as_live(tmp_path):
    out = tmp_path / "out"
    _write_lock(out, os.getpid() + 1, host="some-other-machine")
    args = argparse.Namespace(output_dir=str(out), output_name="lora", dry_run=True)
    with pytest.raises(UserError, match="on some-other-machine"):
        run_lock.hold(args)


def test_stale_lock_of_a_killed_run_does_not_block_and_the_run_removes_its_own(tiny_sd, shapes_data, tmp_path,
                                                                             dead_pid, capsys):
    out = tmp_path / "out"
    lock = _write_lock(out, dead_pid)
    code, err = run_main(train_network.main, base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 1), capsys)
    assert code == 0, err
    assert (out / "lora.safetensors").exists() and not lock.exists()


def test_reused_pid_is_stale(tmp_path, other_process):
    """The pid is alive but it is a different process than the one that took the lock (its start time differs)."""
    out = tmp_path / "out"
    lock = _write_lock(out, other_process.pid, process_start="1")
    args = argparse.Namespace(output_dir=str(out), output_name="lora", dry_run=False)
    try:
        run_lock.hold(args)
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        run_lock.release()
    assert not lock.exists()


def test_lock_is_removed_when_the_run_fails(tiny_sd, shapes_data, tmp_path, capsys, monkeypatch):
    from library.training.runners import run_common

    def bad_models(*a, **k):
        from library.errors import UserError

        raise UserError("stop here")

    monkeypatch.setattr(run_common, "load_base_models", bad_models)
    monkeypatch.setattr("library.training.runners.recipe.load_base_models", bad_models)
    out = tmp_path / "out"
    code, err = run_main(train_network.main, base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 1), capsys)
    assert code == 2 and error_line(err) == "error: stop here"
    assert not out.exists()  # neither the lock nor the folder the lock created is left


def test_other_ranks_take_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    args = argparse.Namespace(output_dir=str(tmp_path / "out"), output_name="lora", dry_run=False)
    run_lock.hold(args)
    assert not (tmp_path / "out").exists()


def test_dry_run_with_stale_lock_passes_and_takes_nothing(tmp_path, dead_pid):
    out = tmp_path / "out"
    lock = _write_lock(out, dead_pid)
    run_lock.hold(argparse.Namespace(output_dir=str(out), output_name="lora", dry_run=True))
    assert json.loads(lock.read_text())["pid"] == dead_pid  # checking never changes a lock


def test_stale_temporaries_of_this_output_name_are_cleaned_at_the_next_start(tmp_path, dead_pid, other_process,
                                                                              caplog):
    out = tmp_path / "out"
    _write_lock(out, dead_pid)
    (out / ".lora-step00000002.safetensors.ab12cd34.tmp").write_bytes(b"half")  # killed mid-write
    (out / "lora-step00000002-state.saving").mkdir()  # killed mid state save
    (out / "lora-step00000002-state.saving" / "optimizer.bin").write_bytes(b"half")
    (out / "lora-step00000001-state.old").mkdir()  # killed mid-swap: the target is missing, the old is good
    (out / "lora-step00000001-state.old" / "train_state.json").write_text("{}")
    (out / ".lora.run.json.zz99yy88.tmp").write_text("{")
    (out / ".lora-v2.safetensors.ab12cd34.tmp").write_bytes(b"busy")  # another live run's (lora-v2) temporary
    (out / ".lora-v2.lock").write_text(json.dumps({"pid": other_process.pid, "host": socket.gethostname(),
                                                   "started": 0.0}))
    (out / ".other.safetensors.ab12cd34.tmp").write_bytes(b"not ours")
    caplog.set_level("INFO")
    try:
        run_lock.hold(argparse.Namespace(output_dir=str(out), output_name="lora", dry_run=False))
    finally:
        run_lock.release()
    assert sorted(p.name for p in out.iterdir()) == [".lora-v2.lock", ".lora-v2.safetensors.ab12cd34.tmp",
                                                     ".other.safetensors.ab12cd34.tmp", "lora-step00000001-state"]
    assert (out / "lora-step00000001-state" / "train_state.json").exists()
    assert "left unfinished by a run that was stopped while saving" in caplog.text
