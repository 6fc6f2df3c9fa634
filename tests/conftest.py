"""Shared test fixtures."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tools.make_tiny_model import write_tiny_flux  # noqa: E402  (after the offline switches)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """Paths of tiny FLUX.1 dev and schnell: {name: {"diffusers", "transformer", "ae", "clip_l", "t5xxl",
    "tokenizer_cache_dir"}} (BFL single files and a Diffusers folder of the same weights)."""
    root = tmp_path_factory.mktemp("tiny_flux")
    return {name: write_tiny_flux(name, root) for name in ("dev", "schnell")}
