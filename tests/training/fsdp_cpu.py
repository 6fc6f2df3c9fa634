"""Run a trainer script with accelerate's FSDP on the CPU (for tests/training/test_sharded_full_training.py).

    accelerate launch --use_fsdp --fsdp_version 2 ... tests/training/fsdp_cpu.py <script.py> <trainer args...>

torch's FSDP2 (``fully_shard``) runs on gloo, but accelerate turns FSDP on only for GPU-like devices: with
``ACCELERATE_USE_CPU=1`` its state stays ``MULTI_CPU`` and the plugin unused. This shim sets the state to FSDP
with the plugin the accelerator built, so everything after (``prepare``, ``get_state_dict``, ``save_state``) is
accelerate's own FSDP2 path, as on a GPU.
"""
import inspect
import runpy
import sys
from pathlib import Path

from accelerate import state
from accelerate.utils import DistributedType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for ``library``
_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = inspect.signature(_init).bind(self, *args, **kwargs).arguments.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        # every later AcceleratorState() copies PartialState's shared values back in: set it there too
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = _fsdp_on_cpu
SCRIPT = sys.argv[1]
sys.argv = [SCRIPT, *sys.argv[2:]]
runpy.run_path(SCRIPT, run_name="__main__")
