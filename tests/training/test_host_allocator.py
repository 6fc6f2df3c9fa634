"""The allocator setting of training processes (library/training/memory/host_allocator.py): a block freed by
one step is reused by the next without faulting its pages in again. Measured in fresh processes with the
kernel's own page-fault counter, with the setting and without it."""
import os
import subprocess
import sys
import textwrap

import pytest

from library.training.memory.host_allocator import keep_freed_memory

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from library.training.memory.host_allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    def one_step():  # activations of a step: blocks above glibc's largest mmap threshold, all freed at its end
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(mib * 2**20 // 4) for mib in (40, 64, 100, 64)]
        del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults = [one_step() for _ in range(6)]
    print(applied, sum(faults[3:]))  # the later steps, once the first ones have grown the heap
""")


def _later_step_faults(mode: str) -> tuple[bool, int]:
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    env.pop("SDT_DEFAULT_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_freed_block_is_reused_without_page_faults():
    applied, kept = _later_step_faults("keep")
    _, default = _later_step_faults("default")
    pages = 3 * (40 + 64 + 100 + 64) * 2**20 // 4096  # what three steps touch
    assert applied
    assert default > pages // 2  # glibc's default: every block was unmapped and faults in again
    # kept: the heap's memory is reused (measured: 8 % of the default's faults on an idle machine, 20 % once in
    # a CI run next to a process building a 4 GB model)
    assert kept < default // 3


def test_opt_out(monkeypatch):
    monkeypatch.setenv("SDT_DEFAULT_MALLOC", "1")
    assert keep_freed_memory() is False
