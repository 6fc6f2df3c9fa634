"""--dry_run (issue 10 §4), receipts and debug report (§5), throughput watch (§6)."""
import json
import re
import shutil

import pytest
from safetensors import safe_open

import train_network
from library.training.extras.receipts import dataset_fingerprint, scrub
from library.training.loop.throughput import ThroughputWatch
from tests.training.train_helpers import base_args, make_shapes_folder
from tools import debug_report


def _number(text: str, label: str) -> int:
    return int(re.search(rf"^\s*{label}: (\d+)$", text, re.M).group(1))


def test_dry_run_step_counts_equal_a_real_run(tiny_sd, tmp_path, capsys):
    data = make_shapes_folder(tmp_path / "data", repeats=3, n=5, sizes=[(64, 64), (96, 64), (64, 128)])
    plan = ["--max_train_epochs", "2", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--validation_split", "0.2", "--save_every_n_steps", "2"]
    out = tmp_path / "out"
    argv = base_args(tiny_sd["sd1"]["safetensors"], data, out, 100, *plan)
    train_network.main(argv + ["--dry_run"])
    text = capsys.readouterr().out
    assert not out.exists()  # nothing written, nothing loaded
    assert "train subset" in text and "4 images x 3 repeats = 12" in text and "1 images held out" in text
    assert re.search(r"^\s+64x64\s+\d+\s+\d+\s+\d+\s+\d+$", text, re.M)  # a bucket row
    assert "estimated peak" in text and "saves: at steps 2, 4" in text
    train_network.main(argv)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert _number(text, "total steps") == int(meta["ss_max_train_steps"]) == int(meta["ss_steps"])
    assert _number(text, "epochs") == int(meta["ss_num_epochs"])
    assert _number(text, "batches per epoch \\(per process\\)") == int(meta["ss_num_batches_per_epoch"])
    assert _number(text, "steps per epoch") * _number(text, "epochs") == _number(text, "total steps")


def test_receipt_beside_each_model(tiny_sd, shapes_data, tmp_path):
    out = tmp_path / "out"
    train_network.main(base_args(tiny_sd["sd1"]["safetensors"], shapes_data, out, 4, "--save_every_n_steps", "1",
                                 "--huggingface_token", "hf_secret", "--save_last_n_steps", "1"))
    receipts = sorted(p.name[:-len(".run.json")] for p in out.glob("*.run.json"))
    models = sorted(p.stem for p in out.glob("*.safetensors"))
    assert receipts == models and len(models) < 5  # one per model, pruned with it
    receipt = json.loads((out / "lora.run.json").read_text())
    assert receipt["seed"] == 7 and receipt["config"]["network_dim"] == 4
    assert "huggingface_token" not in receipt["config"] and "hf_secret" not in json.dumps(receipt)
    assert set(receipt["versions"]) >= {"torch", "diffusers", "transformers", "accelerate"}
    assert "git_commit" in receipt["project"] and receipt["saved"]["file"] == "lora.safetensors"
    assert len(receipt["dataset"]["fingerprint"]) == 64


def test_scrub_and_fingerprint(tmp_path):
    assert scrub({"wandb_api_key": "k", "huggingface_token": "t", "lr": 1e-4, "dirs": ["a", 1]}) == \
        {"lr": 1e-4, "dirs": ["a", 1]}
    from library.config.options import build_parser
    from library.config.dataset_blueprint import dataset_params_from_args
    from library.data.dataset import build_dataset_group

    def fingerprint(root):
        args = build_parser("train_network").parse_args(["--train_data_dir", str(root), "--resolution", "64"])
        group = build_dataset_group(dataset_params_from_args(args, "train_network"), [], seed=1, max_train_steps=1,
                                    max_token_length=None)
        return dataset_fingerprint([group])

    a = make_shapes_folder(tmp_path / "a", n=2)
    shutil.copytree(a, tmp_path / "b")
    assert fingerprint(a) == fingerprint(tmp_path / "b")  # relative paths: the same data anywhere
    (tmp_path / "b" / "1_sks shape" / "0.caption").write_text("another caption", encoding="utf-8")
    assert fingerprint(a) != fingerprint(tmp_path / "b")


def test_debug_report_prints_versions(capsys):
    debug_report.main(["--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["packages"]["torch"] and "python" in report["environment"] and "git_commit" in report["project"]


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_throughput_warns_once_with_the_data_loading_share():
    clock = _Clock()
    watch = ThroughputWatch(clock=clock)

    def step(seconds, data_seconds, images=4):
        def loader():
            clock.t += data_seconds
            yield {}
        list(watch.batches(loader()))
        watch.add_images(images)
        clock.t += seconds - data_seconds
        return watch.step_done()

    assert all(step(0.1, 0.01) is None for _ in range(30))
    assert watch.images_per_second == pytest.approx(40.0)
    messages = [step(1.0, 0.8) for _ in range(25)]
    assert [i for i, m in enumerate(messages) if m] == [19]  # after 20 slow steps, once
    assert "data loading was 80%" in messages[19] and "Likely causes: a starving data loader" in messages[19]
    clock.t += 100.0  # a long save between steps is not a slow step
    watch.mark()
    assert step(0.1, 0.0) is None and not watch.slow
