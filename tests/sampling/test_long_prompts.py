"""Training-side long captions (spec dataset-config §8.1) and hidden-state re-join (losses §9)."""
from __future__ import annotations

import pytest
import torch

from library.formats.long_prompts import count_chunks, join_chunked_hidden_states, split_long_ids
from tests.sampling.fake_tokenizer import BOS, EOS

T = list(range(1000, 1300))  # stand-in token ids


def _padded(n_tokens: int, length: int, pad: int) -> list[int]:
    """What `tokenizer(caption, padding="max_length", truncation=True, max_length=length)` gives."""
    body = T[:min(n_tokens, length - 2)]
    return [BOS] + body + [EOS] + [pad] * (length - 2 - len(body))


def test_short_caption_is_one_row():
    ids = _padded(5, 77, EOS)
    assert split_long_ids(ids, EOS, EOS) == [ids]


def test_sd1_rows_used_as_is():
    rows = split_long_ids(_padded(80, 152, EOS), EOS, EOS)
    assert rows[0] == [BOS] + T[:75] + [EOS]
    assert rows[1] == [BOS] + T[75:80] + [EOS] + [EOS] * 69 + [EOS]


def test_sd2_rows_get_eos_after_real_tokens_and_in_empty_rows():
    pad = 0
    rows = split_long_ids(_padded(80, 227, pad), pad, EOS)
    assert rows[0] == [BOS] + T[:75] + [EOS]  # position 75 real -> last becomes EOS
    assert rows[1] == [BOS] + T[75:80] + [EOS] + [pad] * 69 + [pad]
    assert rows[2] == [BOS, EOS] + [pad] * 75  # empty row: BOS EOS PAD...


def test_full_caption_ends_with_eos():
    rows = split_long_ids(_padded(300, 152, 0), 0, EOS)
    assert rows[1] == [BOS] + T[75:150] + [EOS]


@pytest.mark.parametrize("max_token_length,n", [(150, 2), (225, 3)])
def test_join_chunked_hidden_states(max_token_length: int, n: int):
    h = torch.arange(n * 77, dtype=torch.float32).reshape(1, -1, 1).repeat(2, 1, 3)
    out = join_chunked_hidden_states(h, max_token_length)
    assert out.shape == (2, max_token_length + 2, 3)
    expected = [0] + [k * 77 + j for k in range(n) for j in range(1, 76)] + [n * 77 - 1]
    assert out[0, :, 0].tolist() == expected
    assert join_chunked_hidden_states(h, None) is h


def test_count_chunks():
    assert count_chunks([0], 3) == 1
    assert count_chunks([75], 3) == 1
    assert count_chunks([76, 3], 3) == 2
    assert count_chunks([400], 3) == 3
