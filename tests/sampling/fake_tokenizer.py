"""A word-level stand-in for CLIPTokenizer: one id per whitespace-separated word."""
from __future__ import annotations

BOS, EOS = 49406, 49407


class FakeTokenizer:
    """Word -> id (ids from 1000 up, in first-seen order); `pad` equals EOS (SD1) or 0 (SD2/SDXL TE2)."""

    model_max_length = 77

    def __init__(self, pad_token_id: int = EOS):
        self.bos_token_id, self.eos_token_id, self.pad_token_id = BOS, EOS, pad_token_id
        self.vocab: dict[str, int] = {}

    def id_of(self, word: str) -> int:
        return self.vocab.setdefault(word, 1000 + len(self.vocab))

    def __call__(self, text: str) -> dict:
        return {"input_ids": [BOS] + [self.id_of(w) for w in text.split()] + [EOS]}
