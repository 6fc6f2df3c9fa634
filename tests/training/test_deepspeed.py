"""DeepSpeed through accelerate (--deepspeed, --zero_stage, offload), on the CPU with two processes.

The runs go through tests/training/deepspeed_cpu.py (accelerate counts no processes for DeepSpeed on the CPU) and
would stop with exit code 2 if accelerate had not enabled DeepSpeed or saw another number of processes than were
launched (accelerate_setup checks both), so a pass means DeepSpeed's engine trained with both processes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.training.train_helpers import base_args, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("extra", [["--zero_stage", "2", "--offload_optimizer_device", "cpu"], ["--zero_stage", "1"]])
def test_deepspeed_zero_on_cpu(tiny_sd, shapes_data, tmp_path, extra):
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(ROOT / "tests" / "training" / "deepspeed_cpu.py"),
                        str(ROOT / "train_network.py"),
                        *base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 2, "--deepspeed", *extra,
                                   "--learning_rate", "1e-2")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ups = [v for k, v in load_file(str(out / "lora.safetensors")).items() if k.endswith("lora_up.weight")]
    # the mid block sees a 1x1 latent at 64 px: one token, softmax == 1, so its self-attention q/k get no gradient
    zero = [k for k, v in load_file(str(out / "lora.safetensors")).items() if k.endswith("lora_up.weight")
            and v.abs().sum() == 0 and not ("mid_block" in k and ("attn1_to_q" in k or "attn1_to_k" in k))]
    assert ups and not zero, zero[:5]  # every other module trained (zero-initialised up weights moved)


def test_deepspeed_that_accelerate_drops_is_refused(tiny_sd, shapes_data, tmp_path):
    """ACCELERATE_USE_CPU=1 makes accelerate drop the DeepSpeed plugin silently; the run must not go on without it.
    (A subprocess: accelerate sets ACCELERATE_USE_DEEPSPEED in os.environ, which would leak into later tests.)"""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "train_network.py"),
                        *base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1, "--deepspeed")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 2 and "--deepspeed: accelerate did not enable DeepSpeed" in r.stderr
    assert not (tmp_path / "o" / "lora.safetensors").exists()


def test_a_launch_accelerate_does_not_see_is_refused(tiny_sd, shapes_data, tmp_path):
    """Two processes started by torchrun, DeepSpeed on the CPU without the shim: accelerate sees one process in
    each, so each would train alone and both write the same files; the run stops before loading a model."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(ROOT / "train_network.py"),
                        *base_args(tiny_sd["sd1"]["safetensors"], shapes_data, tmp_path / "o", 1, "--deepspeed")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode != 0
    assert "2 processes were launched but accelerate sees 1" in r.stderr
    assert "loading SD1" not in r.stderr
