"""Caption files, metadata captions and tag frequency (spec dataset-config §4.1, §5)."""
import os

import pytest

from library.data.caption_files import (
    add_tag_frequency,
    caption_candidates,
    count_tags,
    find_caption,
    metadata_caption,
    read_caption_file,
)
from library.errors import UserError


def test_candidates_and_face_crop_fallback():
    assert caption_candidates("/d/img.png", ".txt") == ["/d/img.txt", "/d/img.txt"]
    assert caption_candidates("/d/img_1_2_3_4.png", "txt") == ["/d/img_1_2_3_4.txt", "/d/img.txt"]


def test_find_caption_uses_face_fallback(tmp_path):
    (tmp_path / "cat.caption").write_text("a cat\nsecond\n", encoding="utf-8")
    image = str(tmp_path / "cat_10_20_30_40.png")
    assert find_caption(image, ".caption") == "a cat"
    assert find_caption(str(tmp_path / "dog.png"), ".caption") is None


def test_wildcard_reading_keeps_nonempty_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("  one  \n\n two\r\n   \n", encoding="utf-8")
    assert read_caption_file(str(path)) == "one"
    assert read_caption_file(str(path), enable_wildcard=True) == "one\ntwo"


def test_non_utf8_names_the_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8.*bad.txt"):
        read_caption_file(str(path))


def test_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="empty.*empty.txt"):
        read_caption_file(str(path))
    path.write_text("\n")  # one blank line is a real (empty) caption
    assert read_caption_file(str(path)) == ""


def test_metadata_caption_assembly():
    assert metadata_caption({"caption": "a girl", "tags": "1girl, solo"}) == ("a girl,1girl, solo", "1girl, solo")
    assert metadata_caption({"tags": "1girl, solo"}) == ("1girl, solo", None)
    assert metadata_caption({"caption": "a girl", "tags": ""}) == ("a girl", None)
    assert metadata_caption({}) == ("", None)
    assert metadata_caption({"caption": "x", "tags": "t"}, caption_separator=";") == ("x;t", "t")


def test_metadata_caption_with_wildcards_appends_tags_per_line():
    entry = {"caption": "l1\n\nl2", "tags": "t1\nt2"}
    assert metadata_caption(entry, ",", enable_wildcard=True) == ("l1,t1,t2\nl2,t1,t2", None)
    assert metadata_caption({"caption": "l1\nl2"}, ",", True) == ("l1\nl2", None)


def test_tag_frequency():
    assert count_tags(["A, b ,, a", "c"]) == {"a": 2, "b": 1, "c": 1}
    freq = {}
    add_tag_frequency(freq, os.path.basename("/x/10_dog"), ["dog, Cute"])
    add_tag_frequency(freq, "10_dog", ["dog"])
    assert freq == {"10_dog": {"dog": 2, "cute": 1}}
