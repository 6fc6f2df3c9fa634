"""Validation loss (issue 10 §1): the split, its keys, determinism, and no effect on training."""
import glob
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.config.dataset_blueprint import dataset_params_from_args
from library.config.options import build_parser
from library.data.dataset import build_dataset_group
from library.data.validation_split import split_keys, train_count
from library.errors import UserError
from library.training.extras.validation import band_timesteps
from tests.training.train_helpers import base_args, make_shapes_folder


def _groups(args):
    params = dataset_params_from_args(args, "train_network")
    build = dict(seed=args.seed, max_train_steps=10, max_token_length=None)
    return build_dataset_group(params, [], **build), build_dataset_group(params, [], part="validation", **build)


def _paths(group):
    return [i.path for d in group.datasets for i in d.images] if group is not None else []


def test_split_never_leaks_and_validation_only_subsets(tmp_path):
    train_dir = make_shapes_folder(tmp_path / "a", repeats=3, n=7, name="sks shape")
    val_only = make_shapes_folder(tmp_path / "b", repeats=1, n=2, name="held")
    reg = make_shapes_folder(tmp_path / "r", repeats=1, n=3, name="shape")
    config = tmp_path / "ds.toml"
    config.write_text(f"""
[general]
resolution = 64
validation_seed = 11
[[datasets]]
validation_split = 0.3
  [[datasets.subsets]]
  image_dir = "{train_dir / '3_sks shape'}"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "{val_only / '1_held'}"
  validation_split = 1.0
  [[datasets.subsets]]
  image_dir = "{reg / '1_shape'}"
  is_reg = true
""", encoding="utf-8")
    args = build_parser("train_network").parse_args(["--dataset_config", str(config), "--seed", "1"])
    train, val = _groups(args)
    train_paths, val_paths = _paths(train), _paths(val)
    assert not set(train_paths) & set(val_paths)  # no image in both parts
    everything = {str(p) for d in (train_dir, val_only, reg) for p in d.rglob("*.png")}
    assert set(train_paths) | set(val_paths) == everything
    assert {p for p in val_paths if "1_held" in p} == {p for p in everything if "1_held" in p}  # 1.0: all held out
    assert not any("1_shape" in p for p in val_paths)  # regularization images are never held out
    assert sum("3_sks" in p for p in val_paths) == 7 - train_count(7, 0.3) == 2
    # validation images: one repeat each, no augmentation
    assert all(i.num_repeats == 1 for d in val.datasets for i in d.images)
    assert all(not s.flip_aug and not s.shuffle_caption for d in val.datasets for s in d.subsets)
    # the same seed gives the same split; the train part keeps its repeats
    assert _paths(_groups(args)[1]) == val_paths
    assert all(i.num_repeats == 3 for d in train.datasets for i in d.images if "3_sks" in i.path)


def test_split_is_a_function_of_keys_split_and_seed():
    keys = [f"img{i}.png" for i in range(10)]
    train, val = split_keys(keys, 0.3, 5)
    assert len(val) == 3 and not train & val and train | val == set(keys)  # 10 * 0.7 is not 8 here
    assert split_keys(list(reversed(keys)), 0.3, 5) == (train, val)
    assert split_keys(keys, 0.3, 6) != (train, val)
    assert split_keys(keys, 1.0, 5) == (set(), set(keys))


def test_validation_split_key_is_checked(tmp_path):
    config = tmp_path / "ds.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n'
                      "validation_split = 1.5\n", encoding="utf-8")
    args = build_parser("train_network").parse_args(["--dataset_config", str(config)])
    with pytest.raises(UserError, match=r"validation_split = 1.5: expected a number from 0.0 to 1.0"):
        dataset_params_from_args(args, "train_network")


def test_band_timesteps_spread_evenly():
    assert band_timesteps(0, 1000) == [(100, 0, 199), (300, 200, 399), (500, 400, 599), (700, 600, 799),
                                       (900, 800, 999)]
    assert band_timesteps(200, 700, 2) == [(325, 200, 449), (575, 450, 699)]


class _Batches:
    """A validation group of fixed batches; item ``i`` of a batch has the loss ``values[i]``."""

    def __init__(self, *values):
        self.batches = [{"loss_weights": torch.ones(len(v)), "values": torch.tensor(v)} for v in values]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return self.batches[k]

    def set_current_epoch(self, epoch):
        pass


class _Rank:
    """The accelerator of process ``index`` of ``count``; ``reduce`` adds ``others`` (the other ranks' sums)."""

    def __init__(self, index, count, others=()):
        self.process_index, self.num_processes, self.device = index, count, torch.device("cpu")
        self.others, self.sent = list(others), None

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.sent = tensor.clone()
        return sum(self.others, tensor)


def test_validation_loss_is_the_item_mean_whatever_the_processes():
    """Batches of 2 and 1 items, shared by 1 or 2 processes: the mean over the 3 items, not over the batches."""
    from types import SimpleNamespace

    from library.training.extras.validation import Validator
    from library.training.settings import ValidationSettings

    obj = SimpleNamespace(noise_cfg=SimpleNamespace(min_timestep=None, max_timestep=None, loss_type="l2"),
                          sched=SimpleNamespace(num_train_timesteps=1000))
    method = SimpleNamespace(obj=obj, module=torch.nn.Linear(1, 1), loss=lambda batch, rand: batch["values"].mean())
    settings = ValidationSettings(every_n_steps=1, seed=0)
    group = _Batches([1.0, 2.0], [6.0])
    assert Validator(group, _Rank(0, 1), settings).run(method)["loss/validation"] == pytest.approx(3.0)
    rank1 = _Rank(1, 2)
    Validator(group, rank1, settings).run(method)
    logs = Validator(group, _Rank(0, 2, [rank1.sent]), settings).run(method)
    assert logs["loss/validation"] == pytest.approx(3.0)  # (1 + 2 + 6) / 3; the batch means' mean is 3.75
    assert all(v == pytest.approx(3.0) for k, v in logs.items() if k.startswith("loss/validation_t"))


def _scalars(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(glob.glob(str(logdir / "**" / "events.out.tfevents.*"), recursive=True)[0])
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_validation_does_not_change_training_and_is_deterministic(tiny_sd, tmp_path):
    data = make_shapes_folder(tmp_path / "data", repeats=1, n=5)
    common = ["--validation_split", "0.4", "--network_dropout", "0.1"]
    runs = {}
    for name, extra in (("plain", ["--validate_every_n_epochs", "1000"]), ("val", ["--validate_every_n_steps", "1"]),
                        ("val2", ["--validate_every_n_steps", "2"])):
        out = tmp_path / name
        train_network.main(base_args(tiny_sd["sd1"]["safetensors"], data, out, 4, *common, *extra,
                                     "--logging_dir", str(tmp_path / f"log_{name}")))
        runs[name] = (load_file(str(out / "lora.safetensors")), _scalars(tmp_path / f"log_{name}"))
    plain, val, val2 = runs["plain"], runs["val"], runs["val2"]
    # 1. the training losses and weights are the same with and without validation
    assert plain[1]["loss/current"] == val[1]["loss/current"]
    for key, tensor in plain[0].items():
        assert torch.equal(tensor, val[0][key]), key
    assert "loss/validation" not in plain[1]
    # 2. validation ran every step, with a band breakdown, and gives the same number for the same weights
    assert [s for s, _ in val[1]["loss/validation"]] == [1, 2, 3, 4]
    assert dict(val2[1]["loss/validation"]) == {s: v for s, v in val[1]["loss/validation"] if s % 2 == 0}
    bands = [t for t in val[1] if t.startswith("loss/validation_t")]
    assert len(bands) == 5
    mean = sum(dict(val[1][t])[4] for t in bands) / 5
    assert dict(val[1]["loss/validation"])[4] == pytest.approx(mean, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    from tools.make_tiny_model import write_tiny_model

    return write_tiny_model("sdxl", tmp_path_factory.mktemp("xl"))


@pytest.mark.parametrize("to_disk", [False, True])
def test_sdxl_validation_uses_the_text_encoder_output_cache(tiny_xl, tmp_path, monkeypatch, to_disk):
    """With --cache_text_encoder_outputs the validation images are cached too: no text encoder runs during
    validation, and the loss equals the one with freshly encoded conditioning."""
    import sdxl_train_network
    from library.training.objective import conditioning
    from library.training.extras import validation

    data = make_shapes_folder(tmp_path / "data", repeats=1, n=8)
    calls = {"validation": 0, "elsewhere": 0}
    inside = [False]
    real_encode, real_run = conditioning.encode_sdxl, validation.Validator.run

    def encode(*a, **k):
        calls["validation" if inside[0] else "elsewhere"] += 1
        return real_encode(*a, **k)

    def run(self, method):
        inside[0] = True
        try:
            return real_run(self, method)
        finally:
            inside[0] = False

    monkeypatch.setattr(conditioning, "encode_sdxl", encode)
    monkeypatch.setattr(validation.Validator, "run", run)
    common = ["--network_train_unet_only", "--validation_split", "0.25", "--validate_every_n_steps", "1"]
    losses = {}
    for name, extra in (("cached", ["--cache_text_encoder_outputs"] + (
            ["--cache_text_encoder_outputs_to_disk"] if to_disk else [])), ("fresh", [])):
        calls.update(validation=0, elsewhere=0)
        sdxl_train_network.main(base_args(tiny_xl["safetensors"], data, tmp_path / name, 2, *common, *extra,
                                          "--logging_dir", str(tmp_path / f"log_{name}")))
        losses[name] = dict(_scalars(tmp_path / f"log_{name}")["loss/validation"])
        if name == "cached":
            # the cache encodes each of the 6 training and 2 validation images once (batch size 1), and that is all
            assert calls == {"validation": 0, "elsewhere": 6 + 2}
        else:
            assert calls["validation"] == 2 * 2 * 5  # 2 passes x 2 batches x 5 bands: the probe sees encoding
    assert list(losses["cached"]) == [1, 2]
    for step, value in losses["cached"].items():
        assert value == pytest.approx(losses["fresh"][step], rel=1e-5), step
    if to_disk:  # the validation images' outputs were cached beside them, as the training images' are
        assert len(list((data / "1_sks shape").glob("*_te_outputs.npz"))) == 8
