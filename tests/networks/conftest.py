"""Fixtures for network tests."""
from __future__ import annotations

import pytest

from library.models.tiny import build_tiny_models


@pytest.fixture
def tiny():
    """Factory: ``tiny(family, seed=0)`` -> fresh SDModels in fp32 eval mode."""
    return lambda family, seed=0: build_tiny_models(family, seed=seed)
