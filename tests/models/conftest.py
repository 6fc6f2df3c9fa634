"""Tiny models written once per test session (per xdist worker)."""
import pytest

from tools.make_tiny_model import write_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of tiny SD1/SD2/SDXL models: {family: {"diffusers": folder, "safetensors": file}}."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: write_tiny_model(fam, root) for fam in ("sd1", "sd2", "sdxl")}

