"""tools/canny.py: OpenCV canny edges for ControlNet conditioning images (sd-scripts v0.8.7 tools/canny.py).
Oracle: upstream's own three calls (`cv2.imread`, `cv2.cvtColor(BGR2GRAY)`, `cv2.Canny`) made here, and the
geometry of a drawn square (edges only on its border)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from tools import canny


def _square(path, low: int = 0, high: int = 255) -> None:
    a = np.full((64, 80, 3), low, np.uint8)
    a[16:48, 20:60] = high
    Image.fromarray(a).save(path)


def _run(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        canny.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


def test_edges_match_upstream_calls_and_square_border(tmp_path):
    cv2 = pytest.importorskip("cv2")
    src, out = tmp_path / "in.png", tmp_path / "edges.png"
    _square(src)
    canny.main(["--input", str(src), "--output", str(out)])
    got = np.asarray(Image.open(out))
    want = cv2.Canny(cv2.cvtColor(cv2.imread(str(src)), cv2.COLOR_BGR2GRAY), 32, 224)
    assert got.shape == (64, 80) and np.array_equal(got, want)
    ys, xs = np.nonzero(got)
    assert len(ys) > 0 and set(np.unique(got)) == {0, 255}
    # every edge pixel sits within one pixel of the square's border
    near = (np.minimum(np.abs(ys[:, None] - np.array([15, 16, 47, 48])).min(1),
                       np.abs(xs[:, None] - np.array([19, 20, 59, 60])).min(1)) <= 1)
    assert near.all()


def test_thresholds_are_used(tmp_path):
    """A faint square (contrast 25) has no edges above the default thresholds, and edges with lower ones."""
    pytest.importorskip("cv2")
    src = tmp_path / "faint.png"
    _square(src, 100, 125)
    canny.main(["--input", str(src), "--output", str(tmp_path / "a.png")])
    canny.main(["--input", str(src), "--output", str(tmp_path / "b.png"), "--thres1", "10", "--thres2", "20"])
    assert not np.asarray(Image.open(tmp_path / "a.png")).any()
    assert np.asarray(Image.open(tmp_path / "b.png")).any()


def test_without_opencv_one_line_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    src, out = tmp_path / "in.png", tmp_path / "edges.png"
    _square(src)
    line = _run(capsys, ["--input", str(src), "--output", str(out)])
    assert line == "error: tools/canny.py needs OpenCV: pip install opencv-python-headless"
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    ([], ["--input is required"]),
    (["--input", "{tmp}/missing.png", "--output", "{tmp}/o.png"], ["--input", "missing.png", "no such file"]),
    (["--input", "{tmp}/in.png"], ["--output is required"]),
    (["--input", "{tmp}/in.png", "--output", "{tmp}/o"], ["--output", "extension"]),
    (["--input", "{tmp}/in.png", "--output", "{tmp}/o.png", "--thres1", "-1"], ["--thres1", "0 or more"]),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, words):
    _square(tmp_path / "in.png")
    line = _run(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert all(w in line for w in words), line


def test_unreadable_input_and_unknown_format(tmp_path, capsys):
    pytest.importorskip("cv2")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    line = _run(capsys, ["--input", str(tmp_path / "bad.png"), "--output", str(tmp_path / "o.png")])
    assert "--input" in line and "not an image" in line
    _square(tmp_path / "in.png")
    line = _run(capsys, ["--input", str(tmp_path / "in.png"), "--output", str(tmp_path / "o.xyz")])
    assert "--output" in line and "cannot write" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "in.png"]  # nothing half-written
