"""Tiny models written once per test session (per xdist worker)."""
import pytest

from tools.make_tiny_model import write_tiny_flux, write_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of tiny SD1/SD2/SDXL models: {family: {"diffusers": folder, "safetensors": file}}."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: write_tiny_model(fam, root) for fam in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """Paths of tiny FLUX.1 dev and schnell: {name: {"diffusers", "transformer", "ae", "clip_l", "t5xxl",
    "tokenizer_cache_dir"}} (BFL single files and a Diffusers folder of the same weights)."""
    root = tmp_path_factory.mktemp("tiny_flux")
    return {name: write_tiny_flux(name, root) for name in ("dev", "schnell")}
