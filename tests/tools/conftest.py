"""A tiny WD14-style tagger (ONNX) whose outputs are designed from the image's mean colour.

Model: input NHWC float32 `[batch, S, S, 3]` (BGR, 0-255, as the real tagger), output
`sigmoid(mean_bgr/255 @ W + b)`. Each label has a bias and weights on B, G, R, so a plain
colour image turns on known tags: red (RGB 255,0,0) → `red_theme`, `alice_(wonderland)`,
rating `sensitive`; a BGR/RGB mix-up would give `blue_theme` instead.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

# (name, category, bias, weight on B, G, R)
TINY_LABELS = [
    ("general", "9", 1.0, 0, 0, 0),
    ("sensitive", "9", 0.0, 0, 0, 3),
    ("questionable", "9", -2.0, 0, 0, 0),
    ("explicit", "9", -3.0, 0, 0, 0),
    ("1girl", "0", 5.0, 0, 0, 0),
    ("solo", "0", 1.0, 0, 0, 0),
    ("red_theme", "0", -5.0, 0, 0, 10),
    ("green_theme", "0", -5.0, 0, 10, 0),
    ("blue_theme", "0", -5.0, 10, 0, 0),
    ("^_^", "0", 5.0, 0, 0, 0),
    ("o_o", "0", 5.0, 0, 0, 0),
    ("never_tag", "0", -5.0, 0, 0, 0),
    ("hatsune_miku_(vocaloid)", "4", -5.0, 0, 10, 0),
    ("alice_(wonderland)", "4", -5.0, 0, 0, 10),
]
TINY_REPO = "tiny/wd-tagger"


def write_tiny_tagger(folder: Path, size: int = 32, batch: int | None = None, n_outputs: int | None = None) -> Path:
    """Write `model.onnx` + `selected_tags.csv` into `folder`; return it."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    labels = TINY_LABELS[:n_outputs] if n_outputs else TINY_LABELS
    weights = np.array([[lab[3], lab[4], lab[5]] for lab in labels], dtype=np.float32).T / 255.0  # [3, K]
    bias = np.array([lab[2] for lab in labels], dtype=np.float32)
    k = len(labels)
    batch_dim = batch if batch is not None else "batch"
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "W"], ["logits0"]),
         helper.make_node("Add", ["logits0", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch_dim, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch_dim, k])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, weights.shape, weights.flatten().tolist()),
                     helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias.tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, lab in enumerate(TINY_LABELS):  # the CSV always lists every label
            w.writerow([i, lab[0], lab[1], 100 - i])
    return folder


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A `--model_dir` holding the tiny tagger under `TINY_REPO`'s sub-folder name."""
    root = tmp_path / "models"
    write_tiny_tagger(root / TINY_REPO.replace("/", "_"))
    return root


@pytest.fixture
def make_tiny_tagger():
    """The model writer itself, for variants (fixed batch, wrong output count)."""
    return write_tiny_tagger
