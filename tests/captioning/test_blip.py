"""BLIP captioning (spec utilities §1) on a tiny random-weight transformers model; no downloads."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.make_captions import main
from library.captioning import blip
from tests.captioning.conftest import make_image

ROOT = Path(__file__).resolve().parents[2]


def run(folder: Path, weights: Path | str, *extra: str) -> None:
    main([str(folder), "--caption_weights", str(weights), "--max_length", "12", *extra])


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def direct_captions(weights: Path, images: list[Image.Image], **kwargs) -> list[str]:
    """The oracle: transformers' own `generate` on the same inputs, prompt stripped from the decoded text."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(weights)
    model = BlipForConditionalGeneration.from_pretrained(weights).eval()
    inputs = processor(images=images, text=["a picture of "] * len(images), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], **kwargs)
    return [c[len("a picture of "):] for c in processor.batch_decode(ids, skip_special_tokens=True)]


# ---- post-processing --------------------------------------------------------------------------------

@pytest.mark.parametrize("decoded, expected", [
    ("a picture of a red cat", "a red cat"),
    ("a picture of", ""),
    ("a picture ofa cat", "a cat"),  # prompt without its trailing space
    ("a red cat", "a red cat"),  # no prompt: nothing removed
    ("  a picture of a dog ", "a picture of a dog"),  # leading blanks: not the prompt, only trimmed
])
def test_strip_prompt(decoded, expected):
    assert blip.strip_prompt(decoded) == expected


def test_generation_kwargs_follow_the_original():
    sample = blip.BlipGenerationOptions(top_p=0.8, max_length=30, min_length=7).generate_kwargs()
    assert sample == dict(max_length=30, min_length=7, do_sample=True, top_p=0.8, num_beams=1, repetition_penalty=1.1)
    beams = blip.BlipGenerationOptions(beam_search=True, num_beams=3).generate_kwargs()
    assert beams == dict(max_length=75, min_length=5, num_beams=3, do_sample=False, repetition_penalty=1.0)


# ---- end to end ---------------------------------------------------------------------------------------

def test_one_caption_file_per_image_and_recursive(tmp_path, tiny_blip):
    top = make_image(tmp_path / "data" / "a.png")
    sub = make_image(tmp_path / "data" / "sub" / "b.jpg", (0, 0, 255))
    run(tmp_path / "data", tiny_blip, "--caption_extension", ".txt", "--beam_search")
    assert read(top.with_suffix(".txt")).endswith("\n")
    assert not sub.with_suffix(".txt").exists()
    run(tmp_path / "data", tiny_blip, "--caption_extention", ".cap", "--recursive", "--beam_search")  # legacy alias
    assert top.with_suffix(".cap").exists() and sub.with_suffix(".cap").exists()
    assert sorted(p.name for p in (tmp_path / "data").rglob("*") if p.suffix in (".txt", ".cap")) == \
        ["a.cap", "a.txt", "b.cap"]


def test_beam_search_runs_beams_and_matches_transformers(tmp_path, tiny_blip, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    images = [make_image(tmp_path / "d" / "a.png", (255, 0, 0)), make_image(tmp_path / "d" / "b.png", (0, 90, 200))]
    calls = []
    original = GenerationMixin._beam_search

    def spy(self, *args, **kwargs):
        calls.append(kwargs["generation_config"].num_beams)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "_beam_search", spy)
    run(tmp_path / "d", tiny_blip, "--beam_search", "--num_beams", "3", "--min_length", "6")
    assert calls and set(calls) == {3}
    expected = direct_captions(tiny_blip, [Image.open(p).convert("RGB") for p in images], num_beams=3,
                               max_length=12, min_length=6, repetition_penalty=1.0)
    assert [read(p.with_suffix(".caption")) for p in images] == [c.strip() + "\n" for c in expected]
    assert all(c.strip() for c in expected)


def test_sampling_is_deterministic_for_a_seed(tmp_path, tiny_blip):
    captions = []
    for run_dir in ("one", "two"):
        image = make_image(tmp_path / run_dir / "a.png", (30, 200, 40))
        run(tmp_path / run_dir, tiny_blip, "--seed", "7")
        captions.append(read(image.with_suffix(".caption")))
    assert captions[0] == captions[1] and captions[0].strip()


def test_batches_and_worker_threads_caption_every_image(tmp_path, tiny_blip):
    paths = [make_image(tmp_path / "d" / f"{i}.png", (40 * i, 0, 0)) for i in range(5)]
    run(tmp_path / "d", tiny_blip, "--batch_size", "2", "--max_data_loader_n_workers", "2", "--beam_search")
    assert all(p.with_suffix(".caption").exists() for p in paths)


def test_unreadable_image_is_skipped(tmp_path, tiny_blip, caplog):
    good = make_image(tmp_path / "d" / "good.png")
    bad = tmp_path / "d" / "bad.png"
    bad.write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        run(tmp_path / "d", tiny_blip, "--beam_search")
    assert good.with_suffix(".caption").exists() and not bad.with_suffix(".caption").exists()
    assert "bad.png" in caplog.text and "1 of 2 images could not be read" in caplog.text


def test_all_unreadable_exits_2(tmp_path, tiny_blip, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "d", tiny_blip)
    assert e.value.code == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err
    assert list((tmp_path / "d").iterdir()) == [tmp_path / "d" / "bad.png"]


# ---- model sources offline ----------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["Salesforce/blip-image-captioning-large", blip.DEFAULT_CAPTION_WEIGHTS])
def test_hub_model_offline_exits_2_with_download_hint(tmp_path, weights, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = make_image(tmp_path / "d" / "a.png")
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "d", weights)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Salesforce/blip-image-captioning-large" in err[0]
    err = err[0]
    assert "hf download" in err and "--caption_weights <folder>" in err
    assert not image.with_suffix(".caption").exists()


@pytest.mark.parametrize("weights, message", [
    ("model_large_caption.pth", "original BLIP checkpoints (.pth) are not supported"),
    ("./no/such/folder", "no such folder"),
])
def test_unusable_weights_exit_2(tmp_path, weights, message, capsys):
    make_image(tmp_path / "d" / "a.png")
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "d", weights)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_options_exit_2_before_loading(tmp_path, capsys):
    make_image(tmp_path / "d" / "a.png")
    for extra, message in [(["--batch_size", "0"], "--batch_size"), (["--top_p", "1.5"], "--top_p"),
                           (["--min_length", "20"], "--min_length")]:
        with pytest.raises(SystemExit) as e:
            run(tmp_path / "d", "unused/model", *extra)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_runs_as_a_script_and_names_the_mapping():
    out = subprocess.run([sys.executable, str(ROOT / "finetune" / "make_captions.py"), "--help"],
                         capture_output=True, text=True, cwd="/", check=True).stdout
    assert "Salesforce/blip-image-captioning-large" in out and "--caption_extention" in out
