"""GIT captioning (sd-scripts' make_captions_by_git.py) on a tiny random-weight model; no downloads."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from finetune.make_captions_by_git import main
from library.captioning.git import remove_words
from tests.captioning.conftest import make_image


def run(folder, model, *extra: str) -> None:
    main([str(folder), "--model_id", str(model), *extra])


@pytest.mark.parametrize("caption, expected", [
    ('a sign with the words "hello world" on it', "a sign"),
    ("a red car that says hello on it", "a red car"),
    ("a poster that says hello, with a cat", "a poster, with a cat"),
    ("a book with the number 5 on it", "a book"),
    ("a shirt that has the name bob on the front and a hat", "a shirt that and a hat"),
    ("a cat sitting on a chair", "a cat sitting on a chair"),
])
def test_remove_words(caption, expected):
    assert remove_words(caption) == expected


def test_captions_match_transformers_greedy_generate(tmp_path, tiny_git):
    from transformers import AutoModelForCausalLM, AutoProcessor

    paths = [make_image(tmp_path / "d" / "a.png", (255, 0, 0)), make_image(tmp_path / "d" / "sub" / "b.png", (0, 0, 255))]
    run(tmp_path / "d", tiny_git, "--max_length", "10", "--recursive", "--caption_extension", ".txt",
        "--batch_size", "2")
    processor = AutoProcessor.from_pretrained(tiny_git)
    model = AutoModelForCausalLM.from_pretrained(tiny_git).eval()
    for path in paths:
        inputs = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(pixel_values=inputs["pixel_values"], max_length=10)
        expected = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == expected + "\n"


def test_remove_words_option_applies_the_patterns(tmp_path, tiny_git, monkeypatch):
    from transformers import GitProcessor

    image = make_image(tmp_path / "d" / "a.png")
    # a random tiny model never says this: make decoding return a TextCaps-style caption
    monkeypatch.setattr(GitProcessor, "batch_decode",
                        lambda self, ids, **kwargs: ["a sign that says hello on it"] * len(ids))
    run(tmp_path / "d", tiny_git, "--max_length", "5")
    assert image.with_suffix(".caption").read_text(encoding="utf-8") == "a sign that says hello on it\n"
    run(tmp_path / "d", tiny_git, "--max_length", "5", "--remove_words")
    assert image.with_suffix(".caption").read_text(encoding="utf-8") == "a sign\n"


def test_hub_model_offline_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = make_image(tmp_path / "d" / "a.png")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "d")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "microsoft/git-large-textcaps" in err and "--model_id <folder>" in err
    assert not image.with_suffix(".caption").exists()


def test_unreadable_image_is_skipped(tmp_path, tiny_git):
    good = make_image(tmp_path / "d" / "good.png")
    (tmp_path / "d" / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    run(tmp_path / "d", tiny_git, "--max_length", "8", "--max_data_loader_n_workers", "2")
    assert good.with_suffix(".caption").exists() and not (tmp_path / "d" / "bad.caption").exists()
