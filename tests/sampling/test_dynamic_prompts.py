"""Dynamic prompts `{...}` (spec generation §3)."""
from __future__ import annotations

import random

from library.sampling.dynamic_prompts import expand_dynamic_prompts, parse_count_range


def _rng(seed: int = 0) -> random.Random:
    return random.Random(seed)


def test_no_dynamic_part_is_one_prompt():
    assert expand_dynamic_prompts("a cat", 4, _rng()) == ["a cat"]


def test_single_pick_per_image():
    out = expand_dynamic_prompts("a {red|green|blue} cat", 50, _rng())
    assert len(out) == 50
    assert {p for p in out} == {"a red cat", "a green cat", "a blue cat"}


def test_count_and_separator():
    out = expand_dynamic_prompts("{2$$a|b|c}", 30, _rng())
    assert all(len(p.split(", ")) == 2 and len(set(p.split(", "))) == 2 for p in out)
    out = expand_dynamic_prompts("{1-3$$ and $$a|b|c}", 40, _rng())
    assert {len(p.split(" and ")) for p in out} == {1, 2, 3}
    assert all(set(p.split(" and ")) <= {"a", "b", "c"} for p in out)


def test_enumeration_count_and_order():
    assert expand_dynamic_prompts("{e$$a|b|c} x", 5, _rng()) == ["a x", "b x", "c x"]
    # every combination of two enumerated parts: 3 x 2
    out = expand_dynamic_prompts("{E$$a|b|c} {e$$1|2}", 1, _rng())
    assert out == ["a 1", "a 2", "b 1", "b 2", "c 1", "c 2"]
    # a range enumerates all subsets of those sizes: C(3,1) + C(3,2) = 6
    out = expand_dynamic_prompts("{e$$1-2$$+$$a|b|c}", 1, _rng())
    assert out == ["a", "b", "c", "a+b", "a+c", "b+c"]


def test_enumeration_with_random_part():
    out = expand_dynamic_prompts("{e$$a|b} {x|y}", 7, _rng())
    assert len(out) == 2  # repeat_count ignored when enumerating
    assert [p[0] for p in out] == ["a", "b"] and all(p[2] in "xy" for p in out)


def test_same_rng_seed_same_prompts():
    line = "{red|green|blue} {2$$a|b|c|d} {1-3$$x|y|z}"
    assert expand_dynamic_prompts(line, 10, _rng(5)) == expand_dynamic_prompts(line, 10, _rng(5))
    runs = {tuple(expand_dynamic_prompts(line, 10, _rng(s))) for s in range(5)}
    assert len(runs) > 1


def test_matches_upstream_random_calls():
    # upstream uses the module-level random with randint then sample; a seeded Random replays it
    rng, ref = _rng(9), random.Random(9)
    out = expand_dynamic_prompts("{a|b|c}", 3, rng)
    expected = [", ".join(ref.sample(["a", "b", "c"], ref.randint(1, 1))) for _ in range(3)]
    assert out == expected


def test_count_range_parsing():
    assert parse_count_range(None, 3) == (1, 1)
    assert parse_count_range("2", 3) == (2, 2)
    assert parse_count_range("3-1", 3) == (1, 3)
    assert parse_count_range("1-9", 3) == (1, 3)
    assert parse_count_range("5", 2) == (2, 2)  # upstream would crash here
    assert parse_count_range("1-2-3", 3) == (1, 1)
    assert parse_count_range("-", 3) == (1, 1)
