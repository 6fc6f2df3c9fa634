"""Frozen models leave the accelerator once their outputs are cached, and come back only to sample
(library/training/memory/device_memory.py). On the CPU every device is the same, so the moves are observed."""
import pytest
import torch

import sdxl_train_network
from library.training.memory import device_memory
from tests.training.train_helpers import base_args
from tools.make_tiny_model import write_tiny_model


class Recorder(torch.nn.Module):
    """A module that logs where it is sent (and stays where it is: there is no GPU here)."""

    def __init__(self, log: list, name: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.log, self.name = log, name

    def to(self, *args, **kwargs):
        self.log.append((self.name, str(torch.device(args[0]))))
        return self


def test_parking_moves_out_and_back_only_while_sampling(monkeypatch):
    log, freed = [], []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(len(log)))
    vae, te = Recorder(log, "vae"), Recorder(log, "te")

    class Models:
        text_encoders = [te]

    Models.vae = vae
    acc = type("Acc", (), {"device": torch.device("cuda")})()
    sampled = []
    hook = device_memory.park_unused_models(Models, acc, lambda e, s: sampled.append(list(log)),
                                            latents_cached=True, text_encoders_cached=True)
    assert log == [("vae", "cpu"), ("te", "cpu")] and freed  # parked, cache returned
    n_freed = len(freed)
    hook(1, 10)
    assert sampled == [[("vae", "cpu"), ("te", "cpu"), ("vae", "cuda"), ("te", "cuda")]]  # on device to sample
    assert log[-2:] == [("vae", "cpu"), ("te", "cpu")] and len(freed) > n_freed  # parked again, cache returned


def test_nothing_parked_without_caches(monkeypatch):
    log = []
    vae = Recorder(log, "vae")

    class Models:
        text_encoders = [Recorder(log, "te")]

    Models.vae = vae
    acc = type("Acc", (), {"device": torch.device("cpu")})()
    assert device_memory.park_unused_models(Models, acc, None) is None
    assert log == []


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return write_tiny_model("sdxl", tmp_path_factory.mktemp("sdxl"))


def test_sdxl_run_parks_vae_and_text_encoders_and_still_samples(tiny_sdxl, shapes_data, tmp_path, monkeypatch):
    parked = []
    orig = device_memory.Parking.park

    def park(self, *modules):
        parked.extend(type(m).__name__ for m in modules)
        return orig(self, *modules)

    monkeypatch.setattr(device_memory.Parking, "park", park)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a shape --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    out = tmp_path / "out"
    sdxl_train_network.main(base_args(tiny_sdxl["safetensors"], shapes_data, out, 2, "--cache_latents",
                                      "--cache_text_encoder_outputs", "--network_train_unet_only",
                                      "--sample_prompts", str(prompts), "--sample_every_n_steps", "1"))
    assert parked == ["AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection"]
    assert len(list((out / "sample").glob("*.png"))) == 2
