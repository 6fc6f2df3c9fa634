"""Fixtures and helpers for the fault tests: tiny models and data (shared with tests/training), running a
script's ``main`` to its exit code, and a child process that pauses at a known point for a real signal."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training.conftest import shapes_data, tiny_sd  # noqa: F401  (fixtures reused here)

ROOT = Path(__file__).resolve().parents[2]
PAUSED = "PAUSED"


def run_main(main, argv, capsys) -> tuple[int, str]:
    """Run a script's ``main`` in-process; returns (exit code, stderr). 0 when it returned normally."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def last_line(err: str) -> str:
    """The one line a failed run ends with; the output must hold no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def error_line(err: str) -> str:
    """The single ``error:`` line of a failed run (exactly one, no traceback)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporaries and staging folders anywhere under ``folder`` (there must be none)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith((".tmp", ".saving", ".old")) or ".tmp." in p.name)


# ---------------------------------------------------------------------------------- a child to signal

class Child:
    """``python -c`` running :func:`child_main`: a script that pauses at ``mode`` and prints PAUSED."""

    def __init__(self, tmp_path: Path, mode: str, script: str, argv: list, env: dict | None = None):
        self.err_path = tmp_path / f"child-{time.monotonic_ns()}.err"
        self._err = open(self.err_path, "w")
        code = "from tests.faults.conftest import child_main; child_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code, mode, script, *map(str, argv)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def wait_for(self, marker: str = PAUSED, timeout: float = 600) -> None:
        """Read the child's stdout until a line starts with ``marker``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(marker):
                    return
                if not line and self.proc.poll() is not None:
                    break
        self.proc.kill()
        raise AssertionError(f"the child never printed {marker}: {self.stderr()}")

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._err.close()
        return code, self.stderr()

    def stderr(self) -> str:
        return self.err_path.read_text()


def _pause(label: str, until_stop_requested: bool) -> None:
    """Tell the test we are here, then wait for its signal (a raising handler ends the wait)."""
    from library import interrupts

    print(f"{PAUSED} {label}", flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if until_stop_requested and interrupts.stop_requested():
            return
        time.sleep(0.05)
    raise SystemExit("no signal came")


def child_main() -> None:
    """``argv``: mode script args...  Modes: ``step:K`` (after optimizer step K), ``step:K+state`` (then
    again inside the state save, after accelerate wrote it), ``write`` (after the first safetensors file
    was written inside an atomic save)."""
    mode, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode.startswith("step:"):
        from library.training.loop import checkpointing

        step = int(mode[5:].split("+")[0])
        original = checkpointing.Checkpointer.after_step

        def after_step(self, state):
            original(self, state)
            if state.global_step == step:
                _pause(f"step {step}", until_stop_requested=True)

        checkpointing.Checkpointer.after_step = after_step
        if mode.endswith("+state"):
            import accelerate

            save_state = accelerate.Accelerator.save_state

            def paused_save_state(self, *a, **k):
                out = save_state(self, *a, **k)
                _pause("in state save", until_stop_requested=False)
                return out

            accelerate.Accelerator.save_state = paused_save_state
    elif mode == "write":
        import safetensors.torch

        save_file = safetensors.torch.save_file

        def paused_save_file(*a, **k):
            out = save_file(*a, **k)
            _pause("in write", until_stop_requested=False)
            return out

        safetensors.torch.save_file = paused_save_file
    module = __import__(script, fromlist=["main"])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever started us
    module.main(argv)


@pytest.fixture
def child(tmp_path):
    """Factory: ``child(mode, script, argv)`` -> a started :class:`Child` (killed at the end of the test)."""
    started = []

    def start(mode: str, script: str, argv: list, env: dict | None = None) -> Child:
        c = Child(tmp_path, mode, script, argv, env)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()
