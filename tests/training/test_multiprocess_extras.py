"""Validation loss and EMA with 2 processes (gloo on the CPU, ``accelerate launch --multi_gpu``).

One 2-process run trains 3 steps with validation after every step and an EMA, saving the model, its EMA
and a state after every step; ``mp_probe.py`` records what each rank writes and which validation items it
evaluates. Oracles: one-process validation of the saved weights, the EMA recurrence applied by hand to the
saved weights, and a straight run for a 2-process resume.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_network
from tests.training.test_validation_loss import _scalars
from tests.training.train_helpers import base_args, free_port, make_shapes_folder

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "mp_probe.py"
STEPS, DECAY = 3, 0.8
# 10 images, 3 held out; batch size 2: 4 training batches (2 per process, 2 steps per epoch) and
# validation batches of 2 and 1 items, one per process
EXTRA = ["--validation_split", "0.3", "--validate_every_n_steps", "1", "--train_batch_size", "2",
         "--learning_rate", "1e-2", "--ema", "--ema_decay", str(DECAY), "--save_every_n_steps", "1", "--save_state"]


def _launch(model, data, out, probe, *extra):
    probe.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", str(PROBE),
                        str(probe), str(ROOT / "train_network.py"),
                        *base_args(model, data, out, STEPS, *EXTRA, *extra)],
                       capture_output=True, text=True, env=env, cwd=out.parent, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    return {rank: [json.loads(line) for line in (probe / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}


@pytest.fixture(scope="module")
def two_processes(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    data = make_shapes_folder(root / "data", repeats=1, n=10)
    model = tiny_sd["sd1"]["safetensors"]
    probes = _launch(model, data, root / "out", root / "probe", "--logging_dir", str(root / "logs"))
    return dict(root=root, data=data, model=model, out=root / "out", probes=probes,
                val=dict(_scalars(root / "logs")["loss/validation"]))


def test_validation_with_two_processes_is_the_one_process_value(two_processes, tmp_path):
    run = two_processes
    assert sorted(run["val"]) == [1, 2, 3]
    # 1. every validation item is evaluated exactly once per pass, and both ranks take part
    passes = {rank: [e["validation"] for e in entries if "validation" in e] for rank, entries in run["probes"].items()}
    assert len(passes[0]) == len(passes[1]) == STEPS
    for mine, theirs in zip(passes[0], passes[1]):
        assert sorted([len(mine), len(theirs)]) == [1, 2]  # unequal shards: one batch of 2 items, one of 1
        assert len(set(mine + theirs)) == 3
    assert all(sorted(p[0] + p[1]) == sorted(passes[0][0] + passes[1][0]) for p in zip(*passes.values()))
    # 2. oracle: one process validates the weights the 2-process run saved after steps 1 and 3 (lr 0: a step
    #    changes nothing, so its validation is of those weights)
    for step in (1, STEPS):
        out = tmp_path / f"oracle{step}"
        train_network.main(base_args(run["model"], run["data"], out, 1, "--validation_split", "0.3",
                                     "--validate_every_n_steps", "1", "--train_batch_size", "2",
                                     "--learning_rate", "0", "--logging_dir", str(tmp_path / f"log{step}"),
                                     "--network_weights", str(run["out"] / f"lora-step{step:08d}.safetensors")))
        oracle = dict(_scalars(tmp_path / f"log{step}")["loss/validation"])[1]
        # float32 summation order differs between CPU kernels (2.3e-6 relative measured on an AMD EPYC)
        assert run["val"][step] == pytest.approx(oracle, rel=1e-5, abs=1e-6), step
    assert run["val"][1] != run["val"][STEPS]  # the weights did change


def test_ema_with_two_processes_follows_the_synchronized_weights(two_processes):
    out = two_processes["out"]
    weights = [load_file(str(out / f"lora-step{n:08d}.safetensors")) for n in range(1, STEPS + 1)]
    shadow = {k: v.clone() for k, v in weights[0].items()}  # d = 0 at step 1: a copy
    for n, w in enumerate(weights, start=1):
        s = n - 1
        d = min(DECAY, (1 + s) / (10 + s)) if s > 0 else 0.0
        for k in shadow:
            shadow[k] -= (1 - d) * (shadow[k] - w[k])
        ema = load_file(str(out / f"lora-step{n:08d}-ema.safetensors"))
        assert ema.keys() == shadow.keys()
        for k in shadow:
            torch.testing.assert_close(ema[k], shadow[k], rtol=1e-5, atol=1e-7, msg=f"step {n} {k}")
    final = load_file(str(out / "lora-ema.safetensors"))  # the final save: the EMA after the last step
    for k in shadow:
        torch.testing.assert_close(final[k], shadow[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(not torch.allclose(shadow[k], weights[-1][k]) for k in shadow)  # the EMA is not the last weights


def test_only_rank_0_writes_files(two_processes):
    root = two_processes["root"]
    ours = [Path(e["write"]) for e in two_processes["probes"][1] if "write" in e]
    ours = [p for p in ours if str(p).startswith(str(root)) and not str(p).startswith(str(root / "probe"))]
    # accelerate's save_state stores each process's RNG state (random_states_<rank>.pkl): that is all rank 1 writes
    assert ours and all(p.name == "random_states_1.pkl" for p in ours), ours
    written = {Path(e["write"]).name for e in two_processes["probes"][0] if "write" in e}
    assert {"lora.safetensors", "lora-ema.safetensors", "ema.safetensors", "lora.run.json"} <= written


def test_ema_resume_with_two_processes(two_processes):
    """2 processes: 3 straight steps == 1 step + state + resume + 2 steps, for the model and its EMA."""
    run = two_processes
    state = run["out"] / "lora-step00000001-state"
    assert (state / "ema.safetensors").exists() and (state / "random_states_1.pkl").exists()
    resumed = run["root"] / "resumed"
    _launch(run["model"], run["data"], resumed, run["root"] / "probe_resumed", "--resume", str(state))
    for name in ("lora.safetensors", "lora-ema.safetensors"):
        a, b = load_file(str(run["out"] / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{name} {k}")
