"""Caption rules of spec dataset-config §8, one test per rule, plus combinations."""
import random

import pytest

from library.data.captions import CaptionOptions, process_caption, resolve_warmup_steps


def run(caption, seed=0, **kwargs):
    context = {k: kwargs.pop(k) for k in ("epoch", "step", "max_train_steps", "replacements") if k in kwargs}
    return process_caption(caption, CaptionOptions(**kwargs), random.Random(seed), **context)


def test_plain_caption_untouched():
    assert run("a dog,  running") == "a dog,  running"


def test_prefix_and_suffix():
    assert run("cap", caption_prefix="pre", caption_suffix="suf") == "pre cap suf"
    assert run("cap", caption_prefix="", caption_suffix=None) == "cap"


def test_first_line_only_without_wildcards():
    assert run("line one\nline two") == "line one"


def test_dropout_rate_uses_one_draw():
    for seed in range(20):
        expected_drop = random.Random(seed).random() < 0.5
        assert (run("a, b", seed=seed, caption_dropout_rate=0.5) == "") == expected_drop
    assert run("a, b", caption_dropout_rate=1.0) == ""


def test_dropout_every_n_epochs_counts_from_one():
    # N = 2: epochs 2, 4 dropped; 1, 3 kept
    results = [run("a, b", epoch=e, caption_dropout_every_n_epochs=2) for e in (1, 2, 3, 4)]
    assert results == ["a, b", "", "a, b", ""]


def test_dropout_skips_suffix_and_everything():
    assert run("a", caption_suffix="s", caption_dropout_rate=1.0, shuffle_caption=True) == ""


def test_wildcards_pick_alternatives_and_keep_escaped_braces():
    seen = {run("{red|blue} ball {{x}}", seed=s, enable_wildcard=True) for s in range(30)}
    assert seen == {"red ball {x}", "blue ball {x}"}


def test_wildcards_pick_one_line():
    seen = {run("one\ntwo\nthree", seed=s, enable_wildcard=True) for s in range(40)}
    assert seen == {"one", "two", "three"}


def test_wildcard_placeholders_do_not_clash_with_text():
    caption = "\u2985 {a} }} {{"
    assert run(caption, enable_wildcard=True) == "\u2985 a } {"


def test_keep_tokens_fixes_the_head():
    for seed in range(10):
        out = run("a, b, c, d, e", seed=seed, shuffle_caption=True, keep_tokens=2).split(", ")
        assert out[:2] == ["a", "b"]
        assert sorted(out[2:]) == ["c", "d", "e"]


def test_keep_tokens_without_shuffle_has_no_effect_and_separator_stays():
    assert run("a ||| b,c", keep_tokens=1, keep_tokens_separator="|||") == "a ||| b,c"


def test_keep_tokens_separator_once():
    for seed in range(10):
        out = run("x, y ||| c, d, e", seed=seed, shuffle_caption=True, keep_tokens=0,
                  keep_tokens_separator="|||").split(", ")
        assert out[:2] == ["x", "y"]
        assert sorted(out[2:]) == ["c", "d", "e"]


def test_keep_tokens_separator_twice_pins_a_tail():
    outs = set()
    for seed in range(20):
        out = run("h1, h2 ||| f1, f2, f3 ||| t1, t2 ||| t3", seed=seed, shuffle_caption=True,
                  keep_tokens_separator="|||")
        parts = out.split(", ")
        assert parts[:2] == ["h1", "h2"]
        # a third separator stays inside the tail text
        assert parts[-2:] == ["t1", "t2 ||| t3"]
        assert sorted(parts[2:5]) == ["f1", "f2", "f3"]
        outs.add(out)
    assert len(outs) > 1  # the middle really is shuffled


def test_keep_tokens_separator_wins_over_keep_tokens():
    out = run("a, b ||| c", shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    assert out == "a, b, c"


def test_rejoin_is_always_comma_space():
    assert run("a;b; c", shuffle_caption=True, keep_tokens=3, caption_separator=";") == "a, b, c"


def test_empty_pieces_kept_without_keep_separator():
    # "a,,b" splits into a, "", b; with keep_tokens = 3 nothing moves
    assert run("a,,b", shuffle_caption=True, keep_tokens=3) == "a, , b"


def test_shuffle_is_deterministic_per_seed():
    caption = ", ".join(f"t{i}" for i in range(12))
    assert run(caption, seed=7, shuffle_caption=True) == run(caption, seed=7, shuffle_caption=True)
    outs = {run(caption, seed=s, shuffle_caption=True) for s in range(5)}
    assert len(outs) > 1


def test_shuffle_matches_random_shuffle_of_the_tags():
    tags = ["a", "b", "c", "d", "e"]
    expected = list(tags)
    random.Random(3).shuffle(expected)
    assert run(", ".join(tags), seed=3, shuffle_caption=True) == ", ".join(expected)


def test_secondary_separator_groups_never_split():
    for seed in range(20):
        out = run("red;;;hair, blue;;;eyes, smile, solo", seed=seed, shuffle_caption=True,
                  secondary_separator=";;;")
        assert "red,hair" in out and "blue,eyes" in out
        assert sorted(out.split(", ")) == ["blue,eyes", "red,hair", "smile", "solo"]


def test_secondary_separator_applies_without_tag_processing():
    assert run("a;;;b", secondary_separator=";;;") == "a,b"


def test_tag_dropout_only_touches_flexible_tags():
    assert run("a, b, c", keep_tokens=1, caption_tag_dropout_rate=1.0) == "a"
    for seed in range(10):
        rng = random.Random(seed)
        kept = [t for t in ["b", "c", "d"] if rng.random() >= 0.5]
        assert run("a, b, c, d", seed=seed, keep_tokens=1, caption_tag_dropout_rate=0.5) == ", ".join(["a"] + kept)


@pytest.mark.parametrize("step, expected", [
    # 5 tags, min 1, 10 steps: count = floor(step * (5 - 1) / 10) + 1
    (0, "a"),  # floor(0) + 1 = 1
    (3, "a, b"),  # floor(1.2) + 1 = 2
    (5, "a, b, c"),  # floor(2.0) + 1 = 3
    (9, "a, b, c, d"),  # floor(3.6) + 1 = 4
    (10, "a, b, c, d, e"),  # warmup over
])
def test_token_warmup_counts(step, expected):
    assert run("a, b, c, d, e", step=step, token_warmup_step=10, token_warmup_min=1) == expected


def test_token_warmup_fraction_of_max_train_steps():
    # 0.5 * 20 = 10 steps; step 5 -> floor(5 * 4 / 10) + 1 = 3 tags
    assert resolve_warmup_steps(0.5, 20) == 10
    assert resolve_warmup_steps(25, 20) == 25
    assert run("a, b, c, d, e", step=5, max_train_steps=20, token_warmup_step=0.5) == "a, b, c"


def test_token_warmup_counts_flexible_tags_only():
    # head [a]; 4 flexible, min 1, 10 steps; step 5: floor(5 * 3 / 10) + 1 = 2 -> b, c
    assert run("a, b, c, d, e", step=5, keep_tokens=1, token_warmup_step=10) == "a, b, c"


def test_combination_is_deterministic():
    opts = dict(caption_prefix="sks", shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.3,
                enable_wildcard=True, secondary_separator="::")
    caption = "{photo|drawing}, a::b, c, d, e\nsecond, line, x"
    assert run(caption, seed=11, **opts) == run(caption, seed=11, **opts)


def test_textual_inversion_replacements():
    assert run("a sks dog", replacements={"sks": "sks sks1 sks2"}) == "a sks sks1 sks2 dog"
    outs = {run("x", seed=s, replacements={"": ["t1", "t2"]}) for s in range(20)}
    assert outs == {"t1", "t2"}
    assert run("x", caption_dropout_rate=1.0, replacements={"": "t"}) == ""
