"""sdxl_train / train_db under accelerate's FSDP2 and DeepSpeed on a CUDA GPU (issue 20 item 5; bench/gpu.sh).

The CPU tests (tests/training/test_sharded_full_training.py) run FSDP2 with 2 processes on gloo through a shim;
accelerate turns DeepSpeed on only with a GPU, so DeepSpeed is checked here. One process: the sharding is
trivial, the code path is the real one (the trained models prepared as one bundle, calls through the engine /
FSDP module, full weights gathered before saving). Oracle: the same run without sharding (SGD, float32), equal
within float32 rounding. The log line ``<kind>: ... prepared as one sharded module`` shows the path was taken.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.full_train_helpers import common_args, weights
from tools.make_tiny_model import write_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU (bench/gpu.sh runs these)")]
ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--optimizer_type", "SGDNesterov", "--learning_rate", "0.05", "--save_model_as", "safetensors",
         "--train_batch_size", "1", "--output_name", "m"]
LAUNCH = {
    "plain": [],
    "fsdp": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "false"],
    "zero2": [],
    "zero3": [],
}
OPTIONS = {"plain": [], "fsdp": [], "zero2": ["--deepspeed", "--zero_stage", "2"],
           "zero3": ["--deepspeed", "--zero_stage", "3", "--zero3_save_16bit_model"]}


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return write_tiny_model("sdxl", tmp_path_factory.mktemp("xl"), formats=("safetensors",))["safetensors"]


def _run(kind: str, model: Path, data: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines",
                        "1", "--mixed_precision", "no", "--dynamo_backend", "no", *LAUNCH[kind],
                        str(ROOT / "sdxl_train.py"),
                        *common_args(model, out, 2, "--train_data_dir", str(data), *TRAIN, *OPTIONS[kind], *extra)],
                       capture_output=True, text=True, env=env, cwd=out.parent, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    if kind != "plain":
        name = "fsdp" if kind == "fsdp" else "deepspeed"
        assert f"{name}: unet, te1, te2 prepared as one sharded module" in r.stderr, r.stderr[-2000:]
    return weights(out / "m.safetensors")


@pytest.mark.parametrize("kind", ["fsdp", "zero2", "zero3"])
def test_sdxl_train_sharded_on_one_gpu_equals_the_plain_run(kind, xl, shapes_data, tmp_path):
    if kind.startswith("zero"):
        pytest.importorskip("deepspeed")
    extra = ["--train_text_encoder"]
    plain = _run("plain", xl, shapes_data, tmp_path / "plain", *extra)
    sharded = _run(kind, xl, shapes_data, tmp_path / kind, *extra)
    assert sharded.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(sharded[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)
