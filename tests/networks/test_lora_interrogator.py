"""networks/lora_interrogator.py: which tokens a LoRA's text-encoder part reacts to (sd-scripts v0.8.7).
Oracle: the LoRA merged into a copy of the text encoder by hand (W + alpha/rank * up @ down), and the per-token
mean |difference| of the two encoders' outputs for [BOS, token, EOS], computed here for every token id."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.models.loading import load_models
from networks import lora_interrogator
from tools.make_tiny_model import write_tiny_model

from .helpers import write_lora

LINE = re.compile(r"^\[\s*(\d+)\]: +(\d+) (.{20,}): (\d+\.\d{5})$")


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory) -> str:
    return str(write_tiny_model("sd1", tmp_path_factory.mktemp("interrogate"), formats=("safetensors",))
               ["safetensors"])


def _merged_by_hand(te: torch.nn.Module, sd: dict[str, torch.Tensor]) -> int:
    """Add each lora_te_ module's alpha/rank * up @ down to the matching Linear; returns how many were merged."""
    merged = 0
    with torch.no_grad():
        for name, module in te.named_modules():
            full = name if name.startswith("text_model.") else f"text_model.{name}"
            key = "lora_te_" + full.replace(".", "_")
            if f"{key}.lora_down.weight" in sd:
                down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
                module.weight += float(sd[f"{key}.alpha"]) / down.shape[0] * (up @ down)
                merged += 1
    return merged


def _outputs(te, ids, clip_skip):
    if clip_skip is None:
        return te(ids).last_hidden_state
    hidden = te(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return getattr(te, "text_model", te).final_layer_norm(hidden)


def _oracle_scores(model, lora_path, clip_skip) -> torch.Tensor:
    plain = load_models(model).text_encoders[0].eval()
    merged = load_models(model).text_encoders[0].eval()
    assert _merged_by_hand(merged, load_file(lora_path)) > 0
    ids = torch.arange(49408)
    rows = torch.stack([torch.full_like(ids, 49406), ids, torch.full_like(ids, 49407)], dim=1)
    with torch.no_grad():
        diffs = [(_outputs(plain, r, clip_skip) - _outputs(merged, r, clip_skip)).abs().mean(dim=(1, 2))
                 for r in rows.split(4096)]
    return torch.cat(diffs)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory) -> str:
    return str(write_tiny_model("sd2", tmp_path_factory.mktemp("interrogate2"), formats=("diffusers",))["diffusers"])


@pytest.mark.parametrize("family, clip_skip", [("sd1", None), ("sd1", 2), ("sd2", None)])
def test_ranks_tokens_like_the_hand_merged_encoder(request, tmp_path, capsys, family, clip_skip):
    model = request.getfixturevalue("sd1_file" if family == "sd1" else "sd2_folder")
    meta = {"ss_v2": str(family == "sd2"), "ss_base_model_version": "sd_v2" if family == "sd2" else "sd_v1"}
    lora_path = write_lora(load_models(model), tmp_path / "l.safetensors", metadata=meta)
    argv = ["--sd_model", model, "--model", lora_path, "--batch_size", "1024"] + (["--v2"] if family == "sd2" else [])
    lines = lora_interrogator.main(argv + (["--clip_skip", str(clip_skip)] if clip_skip else []))
    assert capsys.readouterr().out.splitlines() == lines
    assert lines[0] == "top 100:" and len(lines) == 101
    want = _oracle_scores(model, lora_path, clip_skip)
    top = torch.topk(want, 100).values
    parsed = [LINE.match(line) for line in lines[1:]]
    assert all(parsed), lines[1:5]
    ids = [int(m.group(2)) for m in parsed]
    scores = [float(m.group(4)) for m in parsed]
    assert [int(m.group(1)) for m in parsed] == list(range(100)) and len(set(ids)) == 100
    assert scores == sorted(scores, reverse=True)
    for token, score in zip(ids, scores):  # each printed score is the token's own, rounded to 5 decimals
        assert abs(score - float(want[token])) <= 6e-6
    # the printed tokens are the 100 largest differences (up to the printing's rounding)
    assert all(abs(s - float(t)) <= 6e-6 for s, t in zip(scores, top))
    assert float(want[ids[-1]]) >= float(top[-1]) - 1e-5


def test_token_text_is_the_tokenizer_s(sd1_file, tmp_path):
    """Known CLIP ids: 320 is 'a</w>' (printed 'a'), 49406 the start token."""
    lines = lora_interrogator.report_lines([320, 49406, 7], [0.5, 0.25, 0.75], load_models(sd1_file).tokenizers[0], 3)
    assert lines == ["top 3:", f"[  0]:     7 {'(':<20s}: 0.75000", f"[  1]:   320 {'a':<20s}: 0.50000",
                     f"[  2]: 49406 {'<|startoftext|>':<20s}: 0.25000"]


def _exit_line(capsys, argv) -> str:
    capsys.readouterr()  # the test's own model loading logged
    with pytest.raises(SystemExit) as e:
        lora_interrogator.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err  # one line, before any model is loaded
    return err[0]


def test_lora_without_text_encoder_modules(sd1_file, tmp_path, capsys):
    full = load_file(write_lora(load_models(sd1_file), tmp_path / "l.safetensors"))
    save_file({k: v for k, v in full.items() if k.startswith("lora_unet_")}, str(tmp_path / "unet_only.safetensors"),
              {"ss_base_model_version": "sd_v1"})
    line = _exit_line(capsys, ["--sd_model", sd1_file, "--model", str(tmp_path / "unet_only.safetensors")])
    assert "unet_only.safetensors" in line and "no text-encoder modules" in line


@pytest.mark.parametrize("extra, words", [
    (["--model", "{lora}"], ["--sd_model is required"]),
    (["--sd_model", "{sd}"], ["--model is required"]),
    (["--sd_model", "{tmp}/none.safetensors", "--model", "{lora}"], ["--sd_model", "no such file"]),
    (["--sd_model", "{sd}", "--model", "{tmp}/none.safetensors"], ["--model", "no such file"]),
    (["--sd_model", "{sd}", "--model", "{lora}", "--batch_size", "0"], ["--batch_size 0"]),
    (["--sd_model", "{sd}", "--model", "{lora}", "--clip_skip", "0"], ["--clip_skip 0"]),
])
def test_bad_arguments(sd1_file, tmp_path, capsys, extra, words):
    lora = write_lora(load_models(sd1_file), tmp_path / "l.safetensors")
    argv = [a.format(sd=sd1_file, lora=lora, tmp=tmp_path) for a in extra]
    line = _exit_line(capsys, argv)
    assert all(w in line for w in words), line


def test_sdxl_model_refused(tmp_path, capsys):
    sdxl = write_tiny_model("sdxl", tmp_path, formats=("safetensors",))["safetensors"]
    lora = write_lora(load_models(str(write_tiny_model("sd1", tmp_path / "a", formats=("safetensors",))
                                      ["safetensors"])), tmp_path / "l.safetensors")
    line = _exit_line(capsys, ["--sd_model", str(sdxl), "--model", lora])
    assert "SDXL" in line and "not supported" in line
