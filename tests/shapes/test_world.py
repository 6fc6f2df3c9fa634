"""The shapes world: deterministic drawing, held-out splits, both dataset formats readable."""
import json
import os

import numpy as np
import pytest

from library.shapes import world
from tools import make_shapes_dataset


def test_same_seed_same_images_and_index_independent_of_n():
    a = list(world.generate(12, seed=3))
    b = list(world.generate(5, seed=3, start=7))
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a[7:], b))
    assert [s.caption for s in a[7:]] == [s.caption for s in b]
    c = list(world.generate(12, seed=4))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_sizes_captions_and_balance():
    samples = list(world.generate(50, seed=0))
    assert {s.image.shape[1::-1] for s in samples} <= set(world.SIZES)
    assert len({s.image.shape for s in samples}) == 3
    assert all(s.image.dtype == np.uint8 and s.caption == f"a {s.color} {s.shape}" for s in samples)
    # 25 pairs: two full cycles, each pair exactly twice
    counts = {}
    for s in samples:
        counts[(s.color, s.shape)] = counts.get((s.color, s.shape), 0) + 1
    assert len(counts) == 25 and set(counts.values()) == {2}
    assert world.NEW_SHAPE not in {s.shape for s in samples}


def test_diagonal_holdout_covers_each_colour_and_shape_once():
    held = world.diagonal_holdout(world.BASE_COLORS, world.BASE_SHAPES)
    assert sorted(c for c, _ in held) == sorted(world.BASE_COLORS)
    assert sorted(s for _, s in held) == sorted(world.BASE_SHAPES)
    train = {(s.color, s.shape) for s in world.generate(60, holdout=held, split="train")}
    assert not train & set(held) and len(train) == 20
    assert {(s.color, s.shape) for s in world.generate(10, holdout=held, split="holdout")} == set(held)


def test_parse_pairs_and_bad_names():
    assert world.parse_pairs("red:circle, blue star") == [("red", "circle"), ("blue", "star")]
    with pytest.raises(ValueError, match="teal"):
        world.parse_pairs("teal:circle")
    with pytest.raises(ValueError, match="hexagon"):
        list(world.generate(1, shapes=("hexagon",)))


def test_cli_writes_both_formats(tmp_path, capsys):
    out = tmp_path / "ds"
    make_shapes_dataset.main(["--out", str(out), "--n", "8", "--repeats", "3", "--holdout", "red:circle",
                              "--prompt_file", str(tmp_path / "p.txt")])
    folder = out / "3_shapes"
    pngs = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
    assert len(pngs) == 8
    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert sorted(meta) == [p[:-4] for p in pngs]
    for stem, entry in meta.items():
        caption = (folder / f"{stem}.caption").read_text(encoding="utf-8").strip()
        assert entry == {"caption": caption} and caption != "a red circle"
        assert caption.startswith("a ") and len(caption.split()) == 3
    lines = (tmp_path / "p.txt").read_text().splitlines()
    assert len(lines) == 24 and lines[0].endswith("--d 0") and "--w" in lines[0]


def test_cli_formats_are_exclusive(tmp_path):
    make_shapes_dataset.main(["--out", str(tmp_path / "db"), "--n", "2", "--format", "dreambooth"])
    make_shapes_dataset.main(["--out", str(tmp_path / "ft"), "--n", "2", "--format", "finetune"])
    assert not (tmp_path / "db" / "metadata.json").exists()
    assert len(list((tmp_path / "db" / "1_shapes").glob("*.caption"))) == 2
    assert (tmp_path / "ft" / "metadata.json").exists()
    assert not list((tmp_path / "ft" / "1_shapes").glob("*.caption"))


@pytest.mark.parametrize("argv, message", [
    (["--colors", "red,teal"], "teal"),
    (["--sizes", "64x60"], "multiple of 8"),
    (["--n", "0"], "--n"),
    (["--holdout", "red:hexagon"], "hexagon"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        make_shapes_dataset.main(["--out", str(tmp_path / "ds"), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()
