"""Shared fixtures of the sampling tests: tiny Diffusers-format SD1 / SDXL models (written once per module)."""
from __future__ import annotations

import pytest

from library.models.loading import load_models
from tools.make_tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny Diffusers-format models by family ("sd1", "sdxl")."""
    out = tmp_path_factory.mktemp("tiny_diffusers")
    return {f: str(write_tiny_model(f, out, formats=("diffusers",))["diffusers"]) for f in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def sd1(tiny_diffusers):
    return load_models(tiny_diffusers["sd1"])


@pytest.fixture(scope="module")
def sdxl(tiny_diffusers):
    return load_models(tiny_diffusers["sdxl"])
