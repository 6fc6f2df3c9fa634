"""Fixtures for trainer tests."""
import pytest

from tests.training.train_helpers import make_shapes_folder
from tools.make_tiny_model import write_tiny_model


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_train")
    return {fam: write_tiny_model(fam, root) for fam in ("sd1", "sd2")}


@pytest.fixture
def shapes_data(tmp_path):
    return make_shapes_folder(tmp_path / "data", repeats=2, n=3)
