"""Metadata JSON merge (captions, tags) and clean-up (spec utilities §3-§5)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from finetune import clean_captions_and_tags, merge_captions_to_metadata, merge_dd_tags_to_metadata
from library.tagging.clean_rules import clean_caption, clean_tags


def make_dataset(folder: Path, captions: dict[str, str], tags: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in sorted(set(captions) | set(tags)):
        Image.new("RGB", (4, 4)).save(folder / f"{stem}.png")
    for stem, text in captions.items():
        (folder / f"{stem}.caption").write_text(text, encoding="utf-8")
    for stem, text in tags.items():
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return folder


def exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_merge_and_clean_round_trip(tmp_path):
    folder = make_dataset(tmp_path / "imgs",
                          {"a": "an anime girl with a cat\nsecond line\n", "b": "a woman standing"},
                          {"a": "1girl, long_hair, shirt, white_shirt\n", "b": "^_^, solo, rating:safe"})
    meta = tmp_path / "meta.json"
    merge_captions_to_metadata.main([str(folder), str(meta)])
    merge_dd_tags_to_metadata.main([str(folder), str(meta)])  # reads and updates the existing out_json
    merged = json.loads(meta.read_text(encoding="utf-8"))
    assert merged == {"a": {"caption": "an anime girl with a cat\nsecond line", "tags": "1girl, long_hair, shirt, white_shirt"},
                      "b": {"caption": "a woman standing", "tags": "^_^, solo, rating:safe"}}
    assert meta.read_text(encoding="utf-8").startswith('{\n  "a": {\n    "caption"')  # indent=2

    clean = tmp_path / "clean.json"
    clean_captions_and_tags.main([str(meta), str(clean)])
    assert json.loads(clean.read_text(encoding="utf-8")) == {
        "a": {"caption": "an girl with a cat\nsecond line", "tags": "1girl, long hair, white shirt"},
        "b": {"caption": "a girl standing", "tags": "^_^, solo"}}


def test_full_path_keys_recursive_and_in_json(tmp_path):
    folder = make_dataset(tmp_path / "imgs", {"a": "top"}, {})
    make_dataset(folder / "sub", {"b": "deep"}, {})
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"other": {"tags": "x"}}), encoding="utf-8")
    out = tmp_path / "out.json"
    merge_captions_to_metadata.main([str(folder), str(out), "--in_json", str(base), "--full_path", "--recursive"])
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "other": {"tags": "x"}, str(folder / "a.png"): {"caption": "top"},
        str(folder / "sub" / "b.png"): {"caption": "deep"}}


def test_legacy_caption_extention_alias(tmp_path):
    folder = make_dataset(tmp_path / "imgs", {}, {"a": "t"})
    merge_captions_to_metadata.main([str(folder), str(tmp_path / "m.json"), "--caption_extention", ".txt"])
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": {"caption": "t"}}


def test_missing_caption_exit_2_and_nothing_written(tmp_path, capsys):
    folder = make_dataset(tmp_path / "imgs", {"a": "x"}, {"b": "y", "c": "z"})
    out = tmp_path / "meta.json"
    assert exit_code(merge_captions_to_metadata.main, [str(folder), str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 of 3 images have no .caption file" in err and str(folder / "b.caption") in err
    assert not out.exists()
    # an existing out_json is left untouched too
    out.write_text("{}", encoding="utf-8")
    assert exit_code(merge_dd_tags_to_metadata.main, [str(folder), str(out)]) == 2
    assert out.read_text() == "{}"


@pytest.mark.parametrize("argv,message", [
    (["--recursive"], "--recursive requires --full_path"),
    (["--caption_extension", "txt"], "must start with '.'"),
    (["--in_json", "nope.json"], "metadata file not found"),
])
def test_bad_input_exit_2(tmp_path, capsys, argv, message):
    folder = make_dataset(tmp_path / "imgs", {}, {"a": "t"})
    assert exit_code(merge_dd_tags_to_metadata.main, [str(folder), str(tmp_path / "o.json"), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o.json").exists()


def test_clean_missing_input_and_legacy_three_arguments(tmp_path, capsys, caplog):
    assert exit_code(clean_captions_and_tags.main, [str(tmp_path / "nope.json"), str(tmp_path / "o.json")]) == 2
    meta = tmp_path / "in.json"
    meta.write_text(json.dumps({"k": {"caption": "a lady"}}), encoding="utf-8")
    clean_captions_and_tags.main(["ignored_dir", str(meta), str(tmp_path / "o.json")])
    assert json.loads((tmp_path / "o.json").read_text()) == {"k": {"caption": "a girl"}}
    assert "train_data_dir argument is no longer used" in caplog.text
    assert "image does not have tags: k" in caplog.text


# ---- the clean-up rules ------------------------------------------------------------------------------

@pytest.mark.parametrize("tags,expected", [
    ("long_hair, ^_^, blue_eyes", "long hair, ^_^, blue eyes"),
    ("1girl, solo, rating:safe", "1girl, solo"),
    ("1girl, rating:safe, rating:questionable", "1girl"),
    ("shirt, white shirt, hair ornament, red hair ornament", "white shirt, red hair ornament"),
    ("bow, hair bow, bow-tie", "hair bow, bow-tie"),
    # several people: repeated descriptions go, a lone hair length survives the hair-colour rule
    ("2girls, long hair, blue hair, red hair, blue eyes, green eyes, smile", "2girls, long hair, smile"),
    ("2girls, long hair, short hair, blonde hair, ponytail, twintails", "2girls, blonde hair"),
    ("2boys, blue eyes, hime cut", "2boys, blue eyes, hime cut"),
    # a single person keeps everything
    ("1girl, blue hair, red hair, blue eyes, green eyes", "1girl, blue hair, red hair, blue eyes, green eyes"),
    ("", ""),
])
def test_clean_tags(tags, expected):
    assert clean_tags("key", tags) == expected


@pytest.mark.parametrize("caption,expected", [
    ("a young woman and an anime anime anime girl", "a girl and an girl"),
    ("a cartoon image of people", "an image of girls"),
    ("a young young person", "a girl"),
    ("female female", "girl"),  # `girl girl` comes last in the list
    ("women in a cartoon drawing", "girls in a drawing"),
    ("a cat", "a cat"),
])
def test_clean_caption(caption, expected):
    assert clean_caption(caption) == expected
