"""The rule-based evaluator: accuracy on fresh world images, prompts from PNG text, the CLI."""
import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.shapes import evaluate, world
from tools import evaluate_shapes


def _accuracy(samples, strength: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    preds = [evaluate.predict(evaluate.degrade(s.image, rng, strength)) for s in samples]
    n = len(samples)
    return (sum(p.color == s.color for p, s in zip(preds, samples)) / n,
            sum(p.shape == s.shape for p, s in zip(preds, samples)) / n)


def test_accuracy_on_fresh_clean_images():
    samples = list(world.generate(60, seed=555, shapes=evaluate.EVAL_SHAPES))
    color, shape = _accuracy(samples, 0.0, 0)
    assert color >= 0.98 and shape >= 0.95


def test_accuracy_on_degraded_images():
    samples = list(world.generate(60, seed=556, shapes=evaluate.EVAL_SHAPES))
    color, shape = _accuracy(samples, 1.0, 1)
    assert color >= 0.95 and shape >= 0.9


def test_blank_image_finds_nothing():
    p = evaluate.predict(np.full((64, 64, 3), 128, np.uint8))
    assert p.shape is None and p.color is None and p.area_fraction == 0


def test_convex_hull_and_area():
    pts = np.array([[0, 0], [2, 0], [2, 2], [0, 2], [1, 1], [1, 0]], float)
    hull = evaluate.convex_hull(pts)
    assert len(hull) == 4
    assert evaluate.polygon_area_perimeter(hull) == (4.0, 8.0)


def test_parse_prompt():
    assert evaluate.parse_prompt("a red circle --w 64 --h 48") == ("red", "circle")
    assert evaluate.parse_prompt("A photo of a Blue star.") == ("blue", "star")
    assert evaluate.parse_prompt("a green sks", aliases={"sks": "heart"}) == ("green", "heart")
    assert evaluate.parse_prompt("a dog") == (None, None)


def _save(path, sample, prompt: str | None, key: str = "prompt"):
    info = PngInfo()
    if prompt is not None:
        info.add_text(key, prompt)
    sample.to_pil().save(path, pnginfo=info)


def test_cli_reads_prompts_from_png_text(tmp_path, capsys):
    samples = list(world.generate(6, seed=9))
    for s in samples[:5]:
        _save(tmp_path / f"{s.index}.png", s, s.caption)
    # A1111-style "parameters" text: the prompt is its first line
    _save(tmp_path / "a1111.png", samples[5], samples[5].caption + "\nSteps: 20, Seed: 1", key="parameters")
    # a wrong prompt must count as wrong
    wrong = "a red circle" if samples[0].caption != "a red circle" else "a blue star"
    _save(tmp_path / "wrong.png", samples[0], wrong)
    summary = evaluate_shapes.main([str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert summary["n"] == 7 and summary["prompt_accuracy"] == pytest.approx(6 / 7)
    out = capsys.readouterr().out
    assert "BAD wrong.png" in out and "prompt 85.7%" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["images"]) == 7 and report["summary"]["n"] == 7


def test_cli_prompt_map_and_alias(tmp_path):
    s = next(s for s in world.generate(40, seed=2, shapes=("heart",)))
    Image.fromarray(s.image).save(tmp_path / "h.png")
    (tmp_path / "map.json").write_text(json.dumps({"h.png": f"a {s.color} sks"}))
    summary = evaluate_shapes.main([str(tmp_path / "h.png"), "--prompts", str(tmp_path / "map.json"),
                                    "--alias", "sks=heart", "--quiet"])
    assert summary["prompt_accuracy"] == 1.0


def test_cli_image_without_prompt_is_an_error(tmp_path, capsys):
    Image.fromarray(next(world.generate(1)).image).save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as e:
        evaluate_shapes.main([str(tmp_path)])
    assert e.value.code == 2 and "x.png: no prompt" in capsys.readouterr().err
