"""WD14 tag assembly rules, case by case, on hand-written probability vectors (spec utilities §2)."""
from __future__ import annotations

import logging

import pytest

from library.errors import UserError
from library.tagging.tag_rules import (Labels, TagOptions, assemble_tags, expand_character_tag, merge_with_existing,
                                       parse_tag_replacement, prepare_labels, split_always_first, split_undesired)

LABELS = Labels(rating=["general", "sensitive", "questionable", "explicit"],
                general=["1girl", "solo", "long_hair", "^_^"],
                character=["miku_(vocaloid)", "alice", "bob"])
#        ratings              1girl solo long ^_^   miku alice bob
PROBS = [0.1, 0.7, 0.2, 0.1,  0.9, 0.5, 0.3, 0.36, 0.8, 0.4, 0.6]


def tags(**kw) -> list[str]:
    return assemble_tags(PROBS, LABELS, TagOptions(**kw)).tags


def test_default_threshold_csv_order():
    assert tags() == ["1girl", "solo", "^_^", "miku_(vocaloid)", "alice", "bob"]


def test_separate_general_and_character_thresholds():
    assert tags(general_threshold=0.6, character_threshold=0.5) == ["1girl", "miku_(vocaloid)", "bob"]
    # the threshold is inclusive
    assert tags(general_threshold=0.9, character_threshold=0.8) == ["1girl", "miku_(vocaloid)"]


def test_undesired_tags_skip_general_character_and_rating():
    undesired = split_undesired(" solo ,bob,, sensitive", ", ")
    assert undesired == {"solo", "bob", "sensitive"}
    assert tags(undesired_tags=undesired, use_rating_tags=True) == ["1girl", "^_^", "miku_(vocaloid)", "alice"]


def test_character_tags_first_reverses_their_order():
    assert tags(character_tags_first=True) == ["bob", "alice", "miku_(vocaloid)", "1girl", "solo", "^_^"]


@pytest.mark.parametrize("front,last,expected_pos", [(True, False, 0), (False, True, -1), (True, True, 0)])
def test_rating_front_last_and_both(front, last, expected_pos):
    out = tags(use_rating_tags=front, use_rating_tags_as_last_tag=last)
    assert out[expected_pos] == "sensitive" and out.count("sensitive") == 1


def test_no_rating_without_flags():
    result = assemble_tags(PROBS, LABELS, TagOptions())
    assert result.rating == "" and "sensitive" not in result.tags


def test_always_first_last_listed_ends_first_and_unstripped_quirk(caplog):
    opts = TagOptions(always_first_tags=split_always_first("alice,solo", ", "))
    assert assemble_tags(PROBS, LABELS, opts).tags[:2] == ["solo", "alice"]
    with caplog.at_level(logging.WARNING):
        entries = split_always_first("alice, solo", ", ")
    assert entries == ["alice", " solo"]  # not stripped: " solo" never matches (sd-scripts quirk)
    assert "' solo'" in caplog.text and "never match" in caplog.text
    out = assemble_tags(PROBS, LABELS, TagOptions(always_first_tags=entries)).tags
    assert out == ["alice", "1girl", "solo", "^_^", "miku_(vocaloid)", "bob"]


def test_always_first_applies_after_rating_and_character_first():
    opts = TagOptions(always_first_tags=["1girl"], use_rating_tags=True, character_tags_first=True)
    assert assemble_tags(PROBS, LABELS, opts).tags == [
        "1girl", "sensitive", "bob", "alice", "miku_(vocaloid)", "solo", "^_^"]


def test_tag_frequency_counts_emitted_tags_only():
    freq: dict[str, int] = {}
    opts = TagOptions(undesired_tags=frozenset({"bob"}), use_rating_tags_as_last_tag=True)
    assemble_tags(PROBS, LABELS, opts, freq)
    assemble_tags(PROBS, LABELS, opts, freq)
    assert freq == {"1girl": 2, "solo": 2, "^_^": 2, "miku_(vocaloid)": 2, "alice": 2, "sensitive": 2}


@pytest.mark.parametrize("tag,expected", [
    ("miku_(vocaloid)", "miku, vocaloid"),
    ("name_(costume)_(series)", "name_(costume), series"),
    ("plain_name", "plain_name"),
    ("name(series)", "name, series"),
])
def test_character_tag_expand(tag, expected):
    assert expand_character_tag(tag, ", ") == expected


def test_remove_underscore_keeps_short_tags():
    labels = Labels(["r_a_t_e"], ["long_hair", "^_^", "o_o", "a_b_"], ["x_y"])
    out = prepare_labels(labels, ", ", underscore_to_space=True)
    assert out.rating == ["r a t e"] and out.general == ["long hair", "^_^", "o_o", "a b "] and out.character == ["x_y"]


def test_tag_replacement_escapes():
    assert parse_tag_replacement("a,b;c\\,d,e\\;f") == [("a", "b"), ("c,d", "e;f")]
    with pytest.raises(UserError, match="--tag_replacement"):
        parse_tag_replacement("a,b;c")
    with pytest.raises(UserError):
        parse_tag_replacement("a,b,c")


def test_tag_replacement_first_matching_list_only():
    labels = Labels(["same"], ["same", "x"], ["same"])
    out = prepare_labels(labels, ", ", tag_replacement="same,new")
    assert (out.rating, out.general, out.character) == (["same"], ["new", "x"], ["same"])
    out = prepare_labels(Labels(["same"], ["x"], ["same"]), ", ", tag_replacement="same,new")
    assert (out.rating, out.character) == (["same"], ["new"])


def test_prepare_order_expand_then_underscore_then_replacement():
    labels = Labels([], ["long_hair"], ["miku_(vocaloid)"])
    # replacement sees the names after expansion and underscore removal
    out = prepare_labels(labels, ", ", character_tag_expand=True, underscore_to_space=True,
                         tag_replacement="long hair,hair\\, long;miku\\, vocaloid,miku")
    assert out.general == ["hair, long"] and out.character == ["miku"]
    # with underscores kept the expanded name still has its underscore-free form
    assert prepare_labels(labels, " | ", character_tag_expand=True).character == ["miku | vocaloid"]


def test_merge_with_existing_keeps_existing_first():
    assert merge_with_existing("a, b ,c\n", ["c", "d", "a", "e"], ", ") == "a, b, c, d, e"
    assert merge_with_existing("\n", ["x"], ", ") == "x"
    assert merge_with_existing("a|b", ["b", "c"], "|") == "a|b|c"
