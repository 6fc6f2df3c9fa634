"""Bad input: one clear line naming the file, exit code 2, nothing half-written (issue: foundation §9)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_model
from library.errors import UserError
from library.models.loading import load_models

ROOT = Path(__file__).resolve().parents[2]


def _convert_fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        convert_model.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def test_missing_path(tmp_path, capsys):
    err = _convert_fails(capsys, tmp_path / "nope.safetensors", tmp_path / "out.safetensors")
    assert "nope.safetensors" in err and "no such file" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_text_file_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model.ckpt"
    bad.write_text("hello")
    err = _convert_fails(capsys, bad, tmp_path / "out.safetensors")
    assert "model.ckpt" in err and "not a checkpoint" in err


def test_truncated_safetensors(tiny_models, tmp_path, capsys):
    data = Path(tiny_models["sd1"]["safetensors"]).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    err = _convert_fails(capsys, cut, tmp_path / "out.safetensors")
    assert "cut.safetensors" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_unknown_key_layout(tmp_path, capsys):
    f = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(f))
    err = _convert_fails(capsys, f, tmp_path / "out.safetensors")
    assert "other.safetensors" in err and "unknown key layout" in err


def test_shape_mismatch_names_the_tensor(tiny_models, tmp_path, capsys):
    sd = load_file(str(tiny_models["sd1"]["safetensors"]))
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    f = tmp_path / "odd.safetensors"
    save_file(sd, str(f))
    err = _convert_fails(capsys, f, tmp_path / "out.safetensors")
    assert "odd.safetensors" in err and "shape" in err


class _NotATensor:
    def __init__(self):
        self.x = 1


def test_pickle_needing_code_is_refused(tmp_path, capsys):
    f = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callback": _NotATensor()}, f)
    err = _convert_fails(capsys, f, tmp_path / "out.safetensors")
    assert "evil.ckpt" in err and "refused" in err


def test_ckpt_weights_only_loads(tiny_models, tmp_path):
    f = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(str(tiny_models["sd1"]["safetensors"])), "epoch": 1, "global_step": 2}, f)
    m = load_models(str(f))
    assert m.family == "sd1"


def test_family_flag_contradiction(tiny_models, capsys, tmp_path):
    err = _convert_fails(capsys, tiny_models["sd1"]["safetensors"], tmp_path / "o.safetensors", "--v2")
    assert "--v2" in err and "SD1" in err
    err = _convert_fails(capsys, tiny_models["sdxl"]["safetensors"], tmp_path / "o.safetensors", "--v1")
    assert "SDXL" in err


def test_not_a_diffusers_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _convert_fails(capsys, tmp_path / "empty", tmp_path / "o.safetensors")
    assert "not a Diffusers model folder" in err


def test_crash_during_save_keeps_earlier_file(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"earlier checkpoint")
    import safetensors.torch as st

    def dying_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one "interrupted" line, exit code 130 (tests/faults)
        convert_model.main([str(tiny_models["sd1"]["safetensors"]), str(out)])
    assert e.value.code == 130
    assert out.read_bytes() == b"earlier checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_cli_exit_code_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "convert_model.py"), str(tmp_path / "x.ckpt"), str(tmp_path / "y")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "x.ckpt" in r.stderr


def test_vae_override_from_file_and_folder(tiny_models):
    base = load_models(str(tiny_models["sd1"]["safetensors"]))
    other_file = tiny_models["sd2"]["safetensors"]  # a different VAE (other seed draws)
    m = load_models(str(tiny_models["sd1"]["safetensors"]), vae=str(other_file))
    ref = load_models(str(other_file)).vae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in m.vae.state_dict().items())
    m2 = load_models(str(tiny_models["sd1"]["safetensors"]), vae=str(tiny_models["sd2"]["diffusers"]))
    assert all(torch.equal(v, ref[k]) for k, v in m2.vae.state_dict().items())
    assert not all(torch.equal(v, base.vae.state_dict()[k]) for k, v in m.vae.state_dict().items())
    with pytest.raises(UserError, match="--vae"):
        load_models(str(tiny_models["sd1"]["safetensors"]), vae=str(Path(tiny_models["sd1"]["diffusers"]) / "unet"))


def test_sd1_keys_without_text_model_prefix(tiny_models, tmp_path):
    """Some SD1 files lack `text_model.` in the TE keys (spec §f): they load the same."""
    sd = load_file(str(tiny_models["sd1"]["safetensors"]))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in sd.items()}
    f = tmp_path / "old.safetensors"
    save_file(old, str(f))
    a, b = load_models(str(f)), load_models(str(tiny_models["sd1"]["safetensors"]))
    assert all(torch.equal(v, b.text_encoders[0].state_dict()[k]) for k, v in a.text_encoders[0].state_dict().items())


def test_fp16_load_dtype(tiny_models):
    m = load_models(str(tiny_models["sdxl"]["safetensors"]), dtype=torch.float16)
    assert {p.dtype for mod in (m.unet, m.vae, *m.text_encoders) for p in mod.parameters()} == {torch.float16}
