"""The strict shape judge (library/shapes/judge.py), its labelled calibration set
(library/shapes/distractors.py) and the independent cross-check (library/shapes/crosscheck.py).

The oracle is the label each image was drawn with: a clean world shape is that shape, a distractor is
``none`` (docs/demo.md shows what the distractors look like). The thresholds were chosen on seed 99;
this set (seed 77) was not looked at while choosing them.
"""
import ast
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from library.shapes import crosscheck, distractors, evaluate, judge, world

CAL_SEED = 77
PER_SHAPE = 40
PER_DISTRACTOR = 40


@pytest.fixture(scope="module")
def calibration_verdicts():
    out = defaultdict(list)
    for item in distractors.labelled_set(PER_SHAPE, PER_DISTRACTOR, seed=CAL_SEED):
        out[item.kind].append((item.label, judge.judge(item.image).shape, crosscheck.read_shape(item.image).shape))
    return out


def _rate(rows, which: int) -> float:
    return sum(r[0] == r[which] for r in rows) / len(rows)


def test_judge_names_clean_shapes_and_rejects_distractors(calibration_verdicts):
    """Issue 19, item 1: right on >= 98% of clean shapes, ``none`` on >= 95% of distractors."""
    clean = [r for k, rows in calibration_verdicts.items() if k in distractors.CLEAN_SHAPES for r in rows]
    fake = [r for k, rows in calibration_verdicts.items() if k not in distractors.CLEAN_SHAPES for r in rows]
    assert len(clean) == 6 * PER_SHAPE and len(fake) == len(distractors.DISTRACTORS) * PER_DISTRACTOR
    per_kind = {k: _rate(rows, 1) for k, rows in calibration_verdicts.items()}
    assert _rate(clean, 1) >= 0.98, per_kind
    assert _rate(fake, 1) >= 0.95, per_kind
    # no kind of near miss slips through often, and no shape is often refused
    assert min(per_kind.values()) >= 0.8, per_kind


def test_crosscheck_names_clean_shapes(calibration_verdicts):
    """The second method reads the clean world right as well (it is looser on near misses: docs/demo.md)."""
    clean = [r for k, rows in calibration_verdicts.items() if k in distractors.CLEAN_SHAPES for r in rows]
    assert _rate(clean, 2) >= 0.95
    assert _rate(calibration_verdicts["noise"], 2) >= 0.9 and _rate(calibration_verdicts["ellipse"], 2) >= 0.9


def test_labelled_set_is_deterministic_and_labelled():
    a = list(distractors.labelled_set(1, 1, seed=3))
    b = list(distractors.labelled_set(1, 1, seed=3))
    assert [x.kind for x in a] == list(distractors.CLEAN_SHAPES) + list(distractors.DISTRACTORS)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert {x.label for x in a[6:]} == {"none"} and [x.label for x in a[:6]] == list(distractors.CLEAN_SHAPES)


def test_blank_and_noise_only_images_are_none():
    assert judge.judge(np.full((64, 64, 3), 128, np.uint8)).shape == "none"
    assert crosscheck.read_shape(np.full((64, 64, 3), 128, np.uint8)).shape == "none"


def test_verdict_explains_a_rejection():
    rng = np.random.default_rng(0)
    img = distractors.distractor("ellipse", rng, "red", (80, 48))
    v = judge.judge(img)
    assert v.shape == "none" and v.reason and v.score > 1 or v.runner_up - v.score < judge.MARGIN


def test_heart_needs_its_notch():
    """A shield (no cleft) and a heart drawn in the same box: only the heart is a heart."""
    segment = evaluate.segment
    box = (8.0, 8.0, 56.0, 54.0)
    heart = world.shape_alpha("heart", 64, 64, box)
    shield = world.polygon_alpha(distractors.shield_polygon(np.random.default_rng(1)), 64, 64, box)
    notch = lambda a: judge.judge_features(*segment(world.paint(np.full((64, 64, 3), 120.0), a, "red",  # noqa: E731
                                                                  np.random.default_rng(0))))[judge.FEATURES.index("notch")]
    assert notch(heart) > 0.12 and notch(shield) < 0.03


def test_crosscheck_shares_no_code_with_the_judge():
    """Issue 19, item 2: the second method imports neither the judge nor the evaluator it builds on."""
    src = Path(crosscheck.__file__).read_text(encoding="utf-8")
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            names |= {node.module or ""} | {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    assert not names & {"judge", "evaluate", "library.shapes.judge", "library.shapes.evaluate"}, names


def test_a_heart_with_a_deeper_cleft_is_still_a_heart():
    """The one-sided rule (judge.DEEPER_IS_FINE): deepen the drawn heart's cleft, it stays a heart."""
    poly = world.SHAPE_POLYGONS["heart"].copy()
    near = np.abs(poly[:, 0]) < 0.35
    poly[near, 1] += 0.3 * (1 - np.abs(poly[near, 0]) / 0.35) * (poly[near, 1] < 0)
    rng = np.random.default_rng(5)
    bg, _ = world.background(rng, 64, 64)
    img = world.paint(bg, world.polygon_alpha(poly, 64, 64, (10, 10, 54, 52)), "red", rng)
    i = judge.FEATURES.index("notch")
    notch = judge.judge_features(*evaluate.segment(img))[i]
    means, spreads = judge.fitted()
    assert notch > means["heart"][i] + judge.Z_MAX * spreads["heart"][i]  # far deeper than the drawn heart's
    assert judge.judge(img).shape == "heart"
