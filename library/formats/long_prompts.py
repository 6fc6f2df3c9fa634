"""Long prompts: 75-token chunks of 77 ids, shared by training captions and generation.

Pure list/tensor layout functions; no tokenizer or text encoder in here.
spec generation.md §5.2, dataset-config.md §8.1, losses-and-noise.md §9.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

CHUNK_TOKENS = 75  # content tokens per chunk
CHUNK_LENGTH = CHUNK_TOKENS + 2  # with BOS and EOS: CLIP's model_max_length


def count_chunks(token_lengths: Iterable[int], max_embeddings_multiples: int) -> int:
    """n = max(1, min(multiples, (longest - 1) // 75 + 1)) over prompt and negatives. spec gen §5.2."""
    longest = max(token_lengths, default=0)
    return max(1, min(max_embeddings_multiples, (longest - 1) // CHUNK_TOKENS + 1))


def pad_to_chunks(tokens: Sequence[int], weights: Sequence[float], n_chunks: int,
                  bos: int, eos: int, pad: int) -> tuple[list[int], list[float]]:
    """`[BOS] + tokens + [EOS] + padding` of length 75n+2, weights 1.0 off the tokens. spec gen §5.2.

    Pass `pad=eos` for the SD1/2 LPW pipeline and `--weighted_captions`, which pad with EOS.
    """
    length = CHUNK_TOKENS * n_chunks
    tokens, weights = list(tokens[:length]), list(weights[:length])
    ids = [bos] + tokens + [eos] + [pad] * (length - len(tokens))
    return ids, [1.0] + weights + [1.0] * (length + 1 - len(weights))


def split_into_chunks(ids: Sequence[int], pad_id: int, eos_id: int, bos_id: int) -> list[list[int]]:
    """Cut 75n+2 ids into n rows of 77 as gen_img / the LPW pipelines do. spec gen §5.2.

    Each row is ids[75k : 75k+77] with BOS first. SD1 (pad == eos): the last id becomes the sequence's
    last id. SD2/SDXL: the last id becomes EOS when it is a real token, and an empty row
    (BOS then PAD) gets EOS at position 1.
    """
    n = (len(ids) - 2) // CHUNK_TOKENS
    if n <= 1:
        return [list(ids)]
    rows = []
    for k in range(n):
        row = list(ids[k * CHUNK_TOKENS: k * CHUNK_TOKENS + CHUNK_LENGTH])
        row[0] = bos_id
        if pad_id == eos_id:
            row[-1] = ids[-1]
        else:
            if row[-1] not in (eos_id, pad_id):
                row[-1] = eos_id
            if row[1] == pad_id:
                row[1] = eos_id
        rows.append(row)
    return rows


def chunk_weights(weights: Sequence[float]) -> list[list[float]]:
    """Per-token weights of 75n+2 ids laid out like `split_into_chunks` (1.0 on BOS/EOS). spec gen §5.2.

    Upstream builds this layout directly (`no_boseos_middle=False`); it equals this slicing because every
    weight outside the tokens is 1.0.
    """
    n = (len(weights) - 2) // CHUNK_TOKENS
    if n <= 1:
        return [list(weights)]
    return [[1.0] + list(weights[1 + k * CHUNK_TOKENS: 1 + (k + 1) * CHUNK_TOKENS]) + [1.0] for k in range(n)]


def split_long_ids(ids: Sequence[int], pad_id: int, eos_id: int) -> list[list[int]]:
    """Training captions (`get_input_ids`): L = 75n+2 padded ids -> n rows of 77. spec dataset §8.1.

    Row k = [ids[0]] + ids[1+75k : 76+75k] + [ids[-1]]. When pad != eos (SD2, SDXL tokenizer 2): if
    position 75 holds a real token the last position becomes EOS, and a PAD at position 1 becomes EOS.
    """
    if len(ids) <= CHUNK_LENGTH:
        return [list(ids)]
    n = (len(ids) - 2) // CHUNK_TOKENS
    rows = []
    for k in range(n):
        row = [ids[0]] + list(ids[1 + k * CHUNK_TOKENS: 1 + (k + 1) * CHUNK_TOKENS]) + [ids[-1]]
        if pad_id != eos_id:
            if row[-2] not in (eos_id, pad_id):
                row[-1] = eos_id
            if row[1] == pad_id:
                row[1] = eos_id
        rows.append(row)
    return rows


def join_chunked_hidden_states(hidden: torch.Tensor, max_token_length: int | None) -> torch.Tensor:
    """(B, n*77, D) encoder output -> (B, max_token_length+2, D): BOS, 75 per chunk, last. spec losses §9."""
    if max_token_length is None:
        return hidden
    parts = [hidden[:, :1]]
    for i in range(1, max_token_length, CHUNK_LENGTH):
        parts.append(hidden[:, i: i + CHUNK_TOKENS])
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)
