"""Fixtures for the front-end compatibility tests: tiny models of each family and a small image folder."""
import pytest

from tests.training.train_helpers import make_shapes_folder
from tools.make_tiny_model import write_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("client_models")
    return {fam: write_tiny_model(fam, root) for fam in ("sd1", "sd2", "sdxl")}


@pytest.fixture
def image_folder(tmp_path):
    return make_shapes_folder(tmp_path / "data", repeats=2, n=3)
