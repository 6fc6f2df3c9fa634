"""Fixtures for the GPU tests (and their CPU-side checks)."""
import pytest

from tests.training.train_helpers import make_shapes_folder


@pytest.fixture
def shapes_data(tmp_path):
    return make_shapes_folder(tmp_path / "data", repeats=2, n=3)
