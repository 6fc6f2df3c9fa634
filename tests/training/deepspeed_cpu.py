"""Run a trainer script under DeepSpeed with several CPU processes (for the DeepSpeed tests).

    python -m torch.distributed.run --nproc_per_node 2 tests/training/deepspeed_cpu.py <script.py> <args...> --deepspeed

DeepSpeed has a CPU backend, but accelerate counts processes only for GPUs under DeepSpeed: on the CPU every
process sees ``num_processes == 1, process_index == 0`` (each would read the same batches and write the same
files; the trainers refuse such a launch). This shim starts DeepSpeed's process group on gloo first and gives
accelerate's shared state the real world size and ranks; everything after (``prepare``, the engine, saving) is
accelerate's and DeepSpeed's own code.
"""
import os
import runpy
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist
from accelerate import state

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for ``library``
deepspeed.init_distributed(dist_backend="gloo")
_init = state.PartialState.__init__


def _with_the_real_world(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    # PartialState shares one __dict__ between its instances: these set it for every later one too
    self.num_processes = dist.get_world_size()
    self.process_index = dist.get_rank()
    self.local_process_index = int(os.environ.get("LOCAL_RANK", "0"))


state.PartialState.__init__ = _with_the_real_world
SCRIPT = sys.argv[1]
sys.argv = [SCRIPT, *sys.argv[2:]]
runpy.run_path(SCRIPT, run_name="__main__")
