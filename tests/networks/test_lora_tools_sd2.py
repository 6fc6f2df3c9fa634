"""SD2 paths of the LoRA tools (spec utilities §7-§11): OpenCLIP text encoder, linear ``proj_in``.

The oracles do not go through the project's key conversion. The "fine-tuned" checkpoint is made by
editing LDM tensors of the tiny SD2 file directly, and a hand-written table says which kohya LoRA module
each edited tensor belongs to (for the text encoder: which row block of the packed
``attn.in_proj_weight`` = [q; k; v] is ``q_proj``/``k_proj``/``v_proj``) and which Diffusers parameter it
is. Expected LoRA deltas are ``(alpha/rank)·up@down`` composed here by hand, best rank-r factors come
from ``torch.linalg.svd`` here, and diffusers' own kohya loader is a second reader of extracted files.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from networks import check_lora_weights, extract_lora_from_models, merge_lora, resize_lora, svd_merge_lora
from tools.make_tiny_model import write_tiny_model

from .helpers import assert_clamped_svd_factors, write_lora

W = 64  # width of the tiny SD2 text encoder (3 used layers + the unused last block, as SD2's 23 + 1)
TE = "cond_stage_model.model.transformer.resblocks."
UN = "model.diffusion_model."
SD2_META = {"ss_v2": "True", "ss_base_model_version": "sd_v2_v"}
RANK = 6  # rank of every edit of the "fine-tuned" file; extracting at this rank is exact


@dataclass(frozen=True)
class Edit:
    """One edited LDM tensor (or row block of it) and the LoRA module / Diffusers parameter it is."""

    ldm_key: str
    rows: slice | None
    lora_name: str
    component: str  # "text_encoder" or "unet"
    param: str  # TE names without "text_model." (transformers 5 dropped that level; older versions have it)


def _te(layer: int, ldm: str, rows: slice | None, module: str, param: str) -> Edit:
    return Edit(f"{TE}{layer}.{ldm}", rows, f"lora_te_text_model_encoder_layers_{layer}_{module}", "text_encoder",
                f"encoder.layers.{layer}.{param}.weight")


def _unet(ldm: str, diffusers: str) -> Edit:
    return Edit(f"{UN}{ldm}.weight", None, "lora_unet_" + diffusers.replace(".", "_"), "unet", diffusers + ".weight")


EDITS = [
    _te(0, "attn.in_proj_weight", slice(0, W), "self_attn_q_proj", "self_attn.q_proj"),
    _te(0, "attn.in_proj_weight", slice(W, 2 * W), "self_attn_k_proj", "self_attn.k_proj"),
    _te(2, "attn.in_proj_weight", slice(2 * W, 3 * W), "self_attn_v_proj", "self_attn.v_proj"),
    _te(1, "attn.out_proj.weight", None, "self_attn_out_proj", "self_attn.out_proj"),
    _te(2, "mlp.c_fc.weight", None, "mlp_fc1", "mlp.fc1"),
    _te(0, "mlp.c_proj.weight", None, "mlp_fc2", "mlp.fc2"),
    _unet("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),  # Linear in SD2 (2-D in the file)
    _unet("input_blocks.5.1.transformer_blocks.0.attn2.to_k",
          "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"),  # cross-attention: 1024-wide context in SD2
    _unet("middle_block.1.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
    _unet("output_blocks.5.1.transformer_blocks.0.ff.net.0.proj",
          "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"),
    _unet("output_blocks.11.1.proj_out", "up_blocks.3.attentions.2.proj_out"),
    _unet("input_blocks.7.0.in_layers.2", "down_blocks.2.resnets.0.conv1"),  # 3x3
    _unet("input_blocks.7.0.skip_connection", "down_blocks.2.resnets.0.conv_shortcut"),  # 1x1 conv
    _unet("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),  # 3x3
]
UNUSED_BLOCK = f"{TE}3.attn.in_proj_weight"  # SD2's last text block: in the file, never loaded or adapted


def _edit_shape(org: dict, edit: Edit) -> tuple[int, ...]:
    shape = tuple(org[edit.ldm_key].shape)
    return (edit.rows.stop - edit.rows.start, *shape[1:]) if edit.rows else shape


def _apply(sd: dict, edit: Edit, delta: torch.Tensor) -> None:
    """``sd[key][rows] += delta`` on a copy of the tensor (the input dicts are shared)."""
    value = sd[edit.ldm_key].clone()
    if edit.rows:
        value[edit.rows] += delta
    else:
        value += delta
    sd[edit.ldm_key] = value


def _product(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:
    """``up@down`` of LoRA factors in the layer's shape (conv factors flattened by hand)."""
    return (up.float().flatten(1) @ down.float().flatten(1)).reshape(shape)


def _file_deltas(path) -> dict[str, torch.Tensor]:
    """``{module: (alpha/rank)·up@down}`` as 2-D matrices (layer shape flattened after dim 0)."""
    sd = load_file(str(path))
    names = {k.split(".")[0] for k in sd if k.endswith(".lora_down.weight")}
    out = {}
    for n in names:
        up, down = sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"]
        out[n] = float(sd[f"{n}.alpha"]) / down.shape[0] * (up.float().flatten(1) @ down.float().flatten(1))
    return out


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


@dataclass
class Pair:
    folder: str  # Diffusers folder of the original model
    org: str
    tuned: str
    deltas: dict[str, torch.Tensor]  # lora_name -> W_tuned − W_org in the layer's shape


def _sign_symmetric_delta(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A rank-``RANK`` matrix ``U·S·Vᵀ`` (distinct σ) whose singular vectors each hold values in ± pairs.

    Extraction clamps both factors to [−h, h] with h = the ``--clamp_quantile`` of their signed values,
    so even 1.0 (h = max) clips a negative tail longer than the positive one. With every singular vector
    sign-symmetric (whatever sign the SVD picks), h = max |value| and nothing is clipped: the extracted
    LoRA must then equal the edit up to float error.
    """
    def half_pairs(n: int) -> torch.Tensor:
        a, _ = torch.linalg.qr(torch.randn(n // 2, RANK, generator=gen))
        return torch.cat([a, -a])[torch.randperm(n // 2 * 2, generator=gen)] / 2 ** 0.5

    out_dim, in_dim = shape[0], math.prod(shape[1:])
    sigma = torch.linspace(1.0, 0.4, RANK)
    return (half_pairs(out_dim) @ torch.diag(sigma) @ half_pairs(in_dim).T).reshape(shape)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    """Tiny SD2 file and a copy with random rank-6 edits of the table's tensors and of the unused block."""
    root = tmp_path_factory.mktemp("sd2pair")
    paths = write_tiny_model("sd2", root, formats=("diffusers", "safetensors"))
    org = load_file(str(paths["safetensors"]))
    assert org[f"{UN}input_blocks.1.1.proj_in.weight"].ndim == 2 and UNUSED_BLOCK in org  # the SD2 layout
    tuned = dict(org)
    gen = torch.Generator().manual_seed(7)
    deltas = {}
    for edit in EDITS:
        deltas[edit.lora_name] = _sign_symmetric_delta(_edit_shape(org, edit), gen)
        _apply(tuned, edit, deltas[edit.lora_name])
    tuned[UNUSED_BLOCK] = org[UNUSED_BLOCK] + 1.0
    save_file(tuned, str(root / "tuned.safetensors"))
    return Pair(str(paths["diffusers"]), str(paths["safetensors"]), str(root / "tuned.safetensors"), deltas)


@pytest.fixture(scope="module")
def extracted(pair, tmp_path_factory) -> str:
    """Extraction at the edits' rank with the clamp at the maximum: exact up to float error."""
    out = tmp_path_factory.mktemp("sd2extract") / "extracted.safetensors"
    extract_lora_from_models.main(["--v2", "--model_org", pair.org, "--model_tuned", pair.tuned, "--save_to",
                                   str(out), "--dim", str(RANK), "--conv_dim", str(RANK), "--clamp_quantile", "1.0"])
    return str(out)


# ------------------------------------------------------------------------------ extract

def test_extract_v2_recovers_each_edit_under_kohya_names(pair, extracted):
    got = _file_deltas(extracted)
    te_modules = {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(3)
                  for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                            "mlp_fc1", "mlp_fc2")}
    assert {n for n in got if n.startswith("lora_te")} == te_modules  # no module for the unused block
    assert all(n.startswith("lora_unet_") for n in set(got) - te_modules)
    for name, delta in pair.deltas.items():
        torch.testing.assert_close(got[name], delta.flatten(1), atol=2e-6, rtol=0, msg=name)
    for name in set(got) - set(pair.deltas):
        assert float(got[name].abs().max()) < 1e-6, name  # unchanged layers: zero delta

    meta = _metadata(extracted)
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"  # v-param defaults to --v2
    assert meta["ss_network_dim"] == str(RANK) and meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_extract_without_v2_still_labels_sd2(pair, tmp_path):
    """Loading detects SD2 and implies --v2; the LoRA's metadata must follow (it said SD1 before the fix)."""
    out = tmp_path / "nov2.safetensors"
    extract_lora_from_models.main(["--model_org", pair.org, "--model_tuned", pair.tuned, "--save_to", str(out)])
    meta = _metadata(out)
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_extracted_lora_fused_by_diffusers_gives_tuned_weights(pair, extracted, caplog):
    """diffusers' kohya loader (another implementation of the names) fuses the LoRA into the original pipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pair.folder)
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(extracted)
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    edited = {(e.component, e.param): pair.deltas[e.lora_name] for e in EDITS}
    assert set(edited) <= {(c, k.removeprefix("text_model.")) for c, params in before.items() for k in params}
    for component, params in before.items():
        after = getattr(pipe, component).state_dict()
        assert after.keys() == params.keys()
        for key, value in params.items():
            want = value + edited.get((component, key.removeprefix("text_model.")), 0)
            torch.testing.assert_close(after[key], want, atol=2e-6, rtol=0, msg=f"{component}.{key}")


def test_check_lora_weights_lists_sd2_modules(extracted, capsys):
    check_lora_weights.main([extracted])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"number of LoRA modules: {2 * len(_file_deltas(extracted))}"
    assert any(line.startswith(f"lora_te_text_model_encoder_layers_2_self_attn_v_proj.lora_down.weight,({RANK}-64),")
               for line in lines)


# ------------------------------------------------------------------------------ merge into the checkpoint

def _hand_made_lora(org: dict, path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA over the table's modules (rank 3, 3x3 rank 2, alpha 1.5) plus one for the unused block."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for edit in EDITS:
        shape = _edit_shape(org, edit)
        rank = 2 if len(shape) == 4 and shape[2:] != (1, 1) else 3
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        sd[f"{edit.lora_name}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * 0.1
        sd[f"{edit.lora_name}.lora_down.weight"] = torch.randn((rank, *shape[1:]), generator=gen) * 0.1
        sd[f"{edit.lora_name}.alpha"] = torch.tensor(1.5)
    stray = "lora_te_text_model_encoder_layers_3_self_attn_q_proj"  # the block SD2 never loads
    sd.update({f"{stray}.lora_up.weight": torch.ones(W, 1), f"{stray}.lora_down.weight": torch.ones(1, W),
               f"{stray}.alpha": torch.tensor(1.0)})
    save_file(sd, str(path))
    return sd


def test_merge_v2_adds_ratio_times_delta_in_ldm_layout(pair, tmp_path, caplog):
    org = load_file(pair.org)
    lora_path = tmp_path / "hand.safetensors"
    lora_sd = _hand_made_lora(org, lora_path)
    out = tmp_path / "merged.safetensors"
    with caplog.at_level(logging.WARNING):
        merge_lora.main(["--v2", "--sd_model", pair.org, "--models", str(lora_path), "--ratios", "0.7",
                         "--save_to", str(out)])
    assert "lora_te_text_model_encoder_layers_3_self_attn_q_proj" in caplog.text  # logged as unmatched

    want = dict(org)
    for edit in EDITS:
        n = edit.lora_name
        up, down = lora_sd[f"{n}.lora_up.weight"], lora_sd[f"{n}.lora_down.weight"]
        _apply(want, edit, 0.7 * 1.5 / down.shape[0] * _product(up, down, _edit_shape(org, edit)))
    got = load_file(str(out))
    assert got.keys() == org.keys()
    edited = {e.ldm_key for e in EDITS}
    for key, value in want.items():
        if key in edited:
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
            assert not torch.equal(got[key], org[key])
        else:
            assert torch.equal(got[key], value), key  # every other tensor, the unused block included, untouched
    # the packed q/k/v rows outside an edited block are bit-identical
    assert torch.equal(got[f"{TE}0.attn.in_proj_weight"][2 * W:], org[f"{TE}0.attn.in_proj_weight"][2 * W:])
    assert _metadata(out)["modelspec.architecture"] == "stable-diffusion-v2-768-v"


def test_extract_then_merge_v2_rebuilds_the_tuned_file(pair, extracted, tmp_path):
    out = tmp_path / "rebuilt.safetensors"
    merge_lora.main(["--v2", "--sd_model", pair.org, "--models", extracted, "--ratios", "1", "--save_to", str(out)])
    got, tuned, org = load_file(str(out)), load_file(pair.tuned), load_file(pair.org)
    for key, value in tuned.items():
        torch.testing.assert_close(got[key], org[key] if key == UNUSED_BLOCK else value, atol=2e-6, rtol=0, msg=key)


@pytest.mark.parametrize("tool", ["merge", "extract"])
def test_v2_flag_on_an_sd1_model_is_a_user_error(tmp_path, capsys, tool):
    sd1 = str(write_tiny_model("sd1", tmp_path / "m", formats=("safetensors",))["safetensors"])
    lora_path = str(tmp_path / "a.safetensors")
    save_file({"lora_unet_x.lora_up.weight": torch.ones(2, 1), "lora_unet_x.lora_down.weight": torch.ones(1, 2)},
              lora_path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit) as exc:
        if tool == "merge":
            merge_lora.main(["--v2", "--sd_model", sd1, "--models", lora_path, "--ratios", "1", "--save_to", str(out)])
        else:
            extract_lora_from_models.main(["--v2", "--model_org", sd1, "--model_tuned", sd1, "--save_to", str(out)])
    assert exc.value.code == 2 and "--v2" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------ resize / svd merge / LoRA+LoRA

def test_resize_sd2_lora_is_the_best_rank_r_approximation(tiny, tmp_path):
    src = write_lora(tiny("sd2"), tmp_path / "a.safetensors", seed=3, dim=8, alpha=4.0, conv_dim="4",
                     conv_alpha="2", metadata=dict(SD2_META))
    out = tmp_path / "r.safetensors"
    resize_lora.main(["--model", src, "--save_to", str(out), "--new_rank", "3", "--new_conv_rank", "2"])
    before, after, sd = _file_deltas(src), _file_deltas(out), load_file(str(out))
    assert before.keys() == after.keys()
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in after
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in after
    old = load_file(src)
    for name, delta in before.items():
        is_4d = old[f"{name}.lora_down.weight"].ndim == 4  # 1x1 convs take the conv rank too (pitfall 5)
        rank = 2 if is_4d else 3
        assert sd[f"{name}.lora_down.weight"].shape[0] == rank, name
        assert tuple(sd[f"{name}.lora_up.weight"].shape[:2]) == (delta.shape[0], rank)
        old_scale = float(old[f"{name}.alpha"]) / old[f"{name}.lora_down.weight"].shape[0]
        assert float(sd[f"{name}.alpha"]) == pytest.approx(old_scale * rank)  # effective scale kept
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        torch.testing.assert_close(after[name], u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank], atol=1e-6, rtol=1e-4,
                                   msg=name)
        # Eckart-Young: the error is exactly the discarded singular values
        assert float((delta - after[name]).norm()) == pytest.approx(float(s[rank:].norm()), rel=1e-3, abs=1e-7)
    meta = _metadata(out)
    assert meta["ss_v2"] == "True" and meta["ss_network_dim"] == "3"


def test_svd_merge_sd2_loras_is_svd_of_the_summed_deltas(tiny, tmp_path):
    models = tiny("sd2")
    a = write_lora(models, tmp_path / "a.safetensors", seed=1, dim=4, alpha=2.0, conv_dim="2", conv_alpha="1",
                   metadata=dict(SD2_META))
    b = write_lora(models, tmp_path / "b.safetensors", seed=2, dim=2, alpha=4.0, conv_dim=None,
                   metadata=dict(SD2_META))  # other rank, no conv modules
    out = tmp_path / "svd.safetensors"
    svd_merge_lora.main(["--models", a, b, "--ratios", "0.6", "-1.2", "--new_rank", "5", "--new_conv_rank", "3",
                         "--save_to", str(out)])
    da, db, sd = _file_deltas(a), _file_deltas(b), load_file(str(out))
    assert set(db) < set(da) and {k.split(".")[0] for k in sd} == set(da)
    for name in da:
        total = 0.6 * da[name] - 1.2 * db.get(name, torch.zeros_like(da[name]))
        is_kxk = sd[f"{name}.lora_down.weight"].ndim == 4 and sd[f"{name}.lora_down.weight"].shape[-1] != 1
        assert_clamped_svd_factors(sd, name, total, min(3 if is_kxk else 5, *total.shape))
    meta = _metadata(out)
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_lora_lora_merge_v2_labels_sd2(tiny, tmp_path):
    models = tiny("sd2")
    a = write_lora(models, tmp_path / "a.safetensors", seed=1, conv_dim=None, metadata={"ss_network_dim": "4"})
    b = write_lora(models, tmp_path / "b.safetensors", seed=2, conv_dim=None, metadata={"ss_network_dim": "4"})
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--v2", "--models", a, b, "--ratios", "1", "-1", "--save_to", str(out)])
    da, db, do = _file_deltas(a), _file_deltas(b), _file_deltas(out)
    name = "lora_te_text_model_encoder_layers_1_self_attn_k_proj"
    sa, sb = load_file(a), load_file(b)
    # same alpha, ratios ±1: down = d_a − d_b, up = u_a + u_b (sd-scripts' sum of factors, §7)
    want = (sa[f"{name}.lora_up.weight"] + sb[f"{name}.lora_up.weight"]) @ (
        sa[f"{name}.lora_down.weight"] - sb[f"{name}.lora_down.weight"]) * (2.0 / 4)
    torch.testing.assert_close(do[name], want, atol=1e-6, rtol=1e-5)
    assert do.keys() == da.keys() == db.keys()
    assert _metadata(out)["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
