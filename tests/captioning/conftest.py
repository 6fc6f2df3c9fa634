"""Tiny random-weight BLIP and GIT models saved in transformers format (no downloads).

The vocabulary is written by the test: BERT special tokens, BLIP's decoder-start token `[DEC]`
and a few words, so that `BertTokenizer` decodes generated ids into readable words.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

WORDS = ["a", "picture", "of", "red", "green", "blue", "cat", "dog", "sign", "with", "the", "words",
         "that", "says", "on", "it", "hello", "big", "small", "car", "tree", "house", "and", "is"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write_vocab(folder: Path, extra: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    tokens = SPECIALS + WORDS + list(extra)
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path, tokens


def build_tiny_blip(folder: Path) -> Path:
    """Save a tiny `BlipForConditionalGeneration` + `BlipProcessor` (32x32 images) into `folder`."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, tokens = _write_vocab(folder, ("[DEC]",))
    # the hub BLIP tokenizer declares its decoder-start token `[DEC]` as bos, so decoding skips it
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, bos_token="[DEC]")
    text = dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=128,
                bos_token_id=tokens.index("[DEC]"), sep_token_id=tokens.index("[SEP]"),
                pad_token_id=tokens.index("[PAD]"), eos_token_id=tokens.index("[SEP]"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_git(folder: Path) -> Path:
    """Save a tiny `GitForCausalLM` + `GitProcessor` (32x32 images) into `folder`."""
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, tokens = _write_vocab(folder)
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    config = GitConfig(vision_config=vision, vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                       bos_token_id=tokens.index("[CLS]"), eos_token_id=tokens.index("[SEP]"),
                       pad_token_id=tokens.index("[PAD]"))
    torch.manual_seed(0)
    model = GitForCausalLM(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = GitProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip") / "model")


@pytest.fixture(scope="session")
def tiny_git(tmp_path_factory) -> Path:
    return build_tiny_git(tmp_path_factory.mktemp("git") / "model")


def make_image(path: Path, colour=(255, 0, 0), size=(40, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path
