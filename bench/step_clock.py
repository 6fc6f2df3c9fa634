#!/usr/bin/env python
"""Run a training script as ``__main__`` and log the wall clock at the end of every optimizer step.

    python bench/step_clock.py --log FILE -- SCRIPT [script options...]

Both tools step a ``torch.optim`` optimizer once per training step, so a global step post hook (torch >= 2.0)
stamps the same point of the loop in either without changing a line of it. The intervals between stamps are
the steps' own time: model loading, start-up and the saves after the last step drop out, which a difference of
two whole-process wall times cannot guarantee on a noisy machine. Standard library and torch only: it also runs
in upstream's venv. One line per step (``perf_counter``, user and system CPU seconds, minor page faults so far),
flushed at once so a crash keeps what was timed.
"""
from __future__ import annotations

import resource
import runpy
import sys
import time


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv or argv[:1] != ["--log"] or argv.index("--") != 2:
        sys.exit("usage: step_clock.py --log FILE -- SCRIPT [options...]")
    log_path, script, rest = argv[1], argv[3], argv[4:]

    from torch.optim.optimizer import register_optimizer_step_post_hook

    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - stays open for the life of the process

    def stamp(optimizer, args, kwargs) -> None:
        use = resource.getrusage(resource.RUSAGE_SELF)
        log.write(f"{time.perf_counter():.6f} {use.ru_utime:.6f} {use.ru_stime:.6f} {use.ru_minflt}\n")
        log.flush()

    register_optimizer_step_post_hook(stamp)
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
