"""Text-encoder output cache interface with a fake encoder (spec dataset-config §10.1, §11)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from library.config.dataset_blueprint import SubsetParams
from library.data.te_cache import cache_text_encoder_outputs
from library.errors import UserError
from tests.data.dataset_helpers import build, db_params, make_folder


class FakeTextEncoders:
    """Deterministic per-caption arrays: value = caption length."""

    def __init__(self):
        self.captions: list[str] = []

    def __call__(self, captions):
        self.captions += captions
        fill = np.array([len(c) for c in captions], np.float32)
        return {"hidden_state1": np.ones((len(captions), 77, 8), np.float32) * fill[:, None, None],
                "hidden_state2": np.ones((len(captions), 77, 12), np.float32) * fill[:, None, None],
                "pool2": np.ones((len(captions), 12), np.float32) * fill[:, None]}


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "1_x", [(64, 64)] * 3, {0: "a cat", 1: "a long dog caption"})


@pytest.mark.parametrize("to_disk", [False, True])
def test_cached_outputs_replace_input_ids(folder, to_disk):
    subset = SubsetParams(image_dir=str(folder), class_tokens="cls", caption_prefix="ignored")
    group = build([db_params([subset], batch_size=3)], family="sdxl", te_cache_expected=True)
    encoder = FakeTextEncoders()
    cache_text_encoder_outputs(group, encoder, to_disk=to_disk)
    assert sorted(encoder.captions) == ["a cat", "a long dog caption", "cls"]  # raw captions
    batch = group[0]
    assert batch["input_ids"] is None and batch["input_ids2"] is None
    assert batch["text_encoder_outputs1_list"].shape == (3, 77, 8)
    assert batch["text_encoder_outputs2_list"].shape == (3, 77, 12)
    assert batch["text_encoder_pool2_list"].shape == (3, 12)
    for caption, pool in zip(batch["captions"], batch["text_encoder_pool2_list"]):
        assert float(pool[0]) == len(caption)
    if to_disk:
        assert os.path.isfile(folder / "img0_te_outputs.npz")
        again = FakeTextEncoders()
        cache_text_encoder_outputs(group, again, to_disk=True)
        assert again.captions == []  # existing files reused


def test_caption_randomness_refused(folder):
    with pytest.raises(UserError, match="shuffle_caption"):
        build([db_params([SubsetParams(image_dir=str(folder), shuffle_caption=True)])], te_cache_expected=True)
    group = build([db_params([SubsetParams(image_dir=str(folder), caption_tag_dropout_rate=0.1)])])
    assert not group.is_text_encoder_output_cacheable()
    with pytest.raises(UserError, match="caption_tag_dropout_rate"):
        cache_text_encoder_outputs(group, FakeTextEncoders(), to_disk=False)
