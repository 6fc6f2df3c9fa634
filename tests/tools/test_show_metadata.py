"""tools/show_metadata.py: safetensors header metadata as sorted JSON (spec utilities §15)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from tools.show_metadata import main


def test_prints_sorted_indented_json(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(path), metadata={"z_key": "1", "a_key": "{\"x\": 2}"})
    main(["--model", str(path)])
    out = capsys.readouterr().out
    assert out == json.dumps({"a_key": "{\"x\": 2}", "z_key": "1"}, indent=4, sort_keys=True) + "\n"
    assert out.index("a_key") < out.index("z_key")


def test_no_metadata_logged(tmp_path, capsys, caplog):
    path = tmp_path / "m.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(path))
    main(["--model", str(path)])
    assert capsys.readouterr().out == "" and "No metadata found" in caplog.text


@pytest.mark.parametrize("content,message", [(None, "model file not found"), (b"garbage", "not a readable")])
def test_bad_file_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "m.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(path)])
    assert e.value.code == 2 and message in capsys.readouterr().err
