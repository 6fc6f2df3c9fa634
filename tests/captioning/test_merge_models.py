"""tools/merge_models.py (spec utilities §16) on tiny safetensors files, checked against hand computation."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tools.merge_models import is_unet_key, main

UNET = "model.diffusion_model.input_blocks.0.0.weight"
ONLY_A = "model.diffusion_model.out.2.bias"  # missing from model B
ONLY_B = "model.diffusion_model.extra.weight"  # only in model B: dropped
VAE = "first_stage_model.decoder.conv_in.weight"
TE_OLD = "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"  # SD1 layout without `text_model.`
TE_NEW = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
POS_OLD = "cond_stage_model.transformer.embeddings.position_ids"
POS_NEW = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def ints(*shape: int, start: int = 0) -> torch.Tensor:
    """Small integer-valued floats: every weighted sum below is exact in float32."""
    return torch.arange(start, start + torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    a = {UNET: ints(2, 3), ONLY_A: ints(4, start=10), VAE: ints(3, start=-5), TE_OLD: ints(2, 2, start=3),
         POS_OLD: torch.arange(4, dtype=torch.int64).unsqueeze(0)}
    b = {UNET: ints(2, 3, start=100), VAE: ints(3, start=50), TE_NEW: ints(2, 2, start=40), ONLY_B: ints(2),
         POS_NEW: torch.arange(4, dtype=torch.int64).unsqueeze(0)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors", a, b


def merge(out: Path, *paths: Path, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    main(["--models", *map(str, paths), "--output", str(out), *extra])
    return load_file(str(out) + ("" if str(out).endswith(".safetensors") else ".safetensors"))


def test_unet_key_rule():
    assert is_unet_key(UNET) and not is_unet_key(VAE) and not is_unet_key(TE_NEW)
    assert not is_unet_key("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight")


def test_weighted_sum_by_hand(tmp_path, models):
    pa, pb, a, b = models
    out = merge(tmp_path / "merged", pa, pb, extra=("--ratios", "0.5", "0.25"))
    assert set(out) == {UNET, ONLY_A, VAE, TE_NEW, POS_NEW}  # ONLY_B dropped, SD1 TE keys rewritten
    assert torch.equal(out[UNET], 0.5 * a[UNET] + 0.25 * b[UNET])  # ratios are not normalised
    assert torch.equal(out[VAE], 0.5 * a[VAE] + 0.25 * b[VAE])
    assert torch.equal(out[TE_NEW], 0.5 * a[TE_OLD] + 0.25 * b[TE_NEW])
    assert torch.equal(out[ONLY_A], 0.75 * a[ONLY_A])  # missing in B: A's value times B's ratio too
    assert out[POS_NEW].dtype == torch.int64 and torch.equal(out[POS_NEW], a[POS_OLD])
    assert out[UNET].dtype == torch.float32
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        assert not f.metadata()


def test_default_ratios_are_equal(tmp_path, models):
    pa, pb, a, b = models
    out = merge(tmp_path / "m.safetensors", pa, pb)
    assert torch.equal(out[UNET], 0.5 * a[UNET] + 0.5 * b[UNET])
    assert torch.equal(out[ONLY_A], a[ONLY_A])


def test_unet_only_copies_text_encoder_and_vae(tmp_path, models):
    pa, pb, a, b = models
    out = merge(tmp_path / "m", pa, pb, extra=("--ratios", "0.25", "0.75", "--unet_only"))
    assert torch.equal(out[UNET], 0.25 * a[UNET] + 0.75 * b[UNET])
    assert torch.equal(out[VAE], a[VAE]) and torch.equal(out[TE_NEW], a[TE_OLD])


def test_precision_options(tmp_path, models):
    pa, pb, _, _ = models
    torch.manual_seed(0)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    save_file({UNET: a}, tmp_path / "ra.safetensors")
    save_file({UNET: b}, tmp_path / "rb.safetensors")
    ratios = ("--ratios", "0.3", "0.7")
    out = merge(tmp_path / "h", tmp_path / "ra.safetensors", tmp_path / "rb.safetensors",
                extra=(*ratios, "--precision", "fp16"))
    expected = 0.3 * a.half() + 0.7 * b.half()
    assert out[UNET].dtype == torch.float32 and torch.equal(out[UNET], expected.float())
    assert not torch.equal(out[UNET], 0.3 * a + 0.7 * b)  # the arithmetic really ran in fp16
    out = merge(tmp_path / "s", tmp_path / "ra.safetensors", tmp_path / "rb.safetensors",
                extra=(*ratios, "--saving_precision", "bf16"))
    assert out[UNET].dtype == torch.bfloat16 and torch.equal(out[UNET], (0.3 * a + 0.7 * b).bfloat16())


def test_show_skipped_lists_keys_only_in_later_models(tmp_path, models, caplog):
    pa, pb, _, _ = models
    with caplog.at_level(logging.INFO):
        merge(tmp_path / "m", pa, pb, extra=("--show_skipped",))
    assert f"Skip: {ONLY_B}" in caplog.text
    assert "Skip: " + TE_NEW not in caplog.text  # same key as A's old-layout one, not skipped


@pytest.mark.parametrize("make_args, message", [
    (lambda d, pa: ["--models", str(pa), str(d / "b.ckpt")], "not a .safetensors file"),
    (lambda d, pa: ["--models", str(pa), str(d / "nope.safetensors")], "no such file"),
    (lambda d, pa: ["--models", str(pa), str(pa), "--ratios", "1"], "1 values for 2 models"),
    (lambda d, pa: ["--models", str(pa), "--device", "nosuchdevice"], "--device nosuchdevice"),
])
def test_bad_input_exits_2_without_output(tmp_path, models, capsys, make_args, message):
    pa = models[0]
    (tmp_path / "b.ckpt").write_bytes(b"pickle")
    with pytest.raises(SystemExit) as e:
        main([*make_args(tmp_path, pa), "--output", str(tmp_path / "out")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_shape_mismatch_exits_2(tmp_path, models, capsys):
    pa = models[0]
    save_file({UNET: torch.zeros(3, 2)}, tmp_path / "c.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["--models", str(pa), str(tmp_path / "c.safetensors"), "--output", str(tmp_path / "out")])
    assert e.value.code == 2 and "different architectures" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))
