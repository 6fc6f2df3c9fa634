"""LoRA tools: merge, extract, resize, svd-merge, check (spec utilities §7-§11, file-formats §b.2)."""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import networks.lora as lora
from library.models.loading import load_models
from networks import check_lora_weights, extract_lora_from_models, merge_lora, resize_lora, sdxl_merge_lora, \
    svd_merge_lora
from networks.lora_svd import dynamic_rank, module_delta
from networks.lora_tool_io import complete_modules
from tools.make_tiny_model import write_tiny_model

from .helpers import assert_clamped_svd_factors, text_encoder_arg, token_ids, unet_inputs
from .helpers import write_lora as _write_lora


def _header_and_data(path) -> tuple[dict, bytes]:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _assert_hash_matches_file(path) -> dict:
    """sshs_model_hash is the SHA-256 of the file's data region (spec §b.2); returns the metadata."""
    header, data = _header_and_data(path)
    meta = header["__metadata__"]
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()
    return meta


def _deltas(path) -> dict[str, torch.Tensor]:
    return {name: module_delta(p["lora_up.weight"], p["lora_down.weight"], float(p["alpha"]))
            for name, p in complete_modules(load_file(str(path)), path).items()}


def _outputs(models) -> list[torch.Tensor]:
    args, kwargs = unet_inputs(models)
    with torch.no_grad():
        outs = [models.unet(*args, **kwargs).sample]
        outs += [te(token_ids()).last_hidden_state for te in models.text_encoders]
    return outs


# ------------------------------------------------------------------------------ merge into a checkpoint

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merged_checkpoint_equals_runtime_lora(tmp_path, family):
    base = write_tiny_model(family, tmp_path, formats=("safetensors",))["safetensors"]
    models = load_models(str(base), sdxl=family == "sdxl")
    lora_path = _write_lora(models, tmp_path / "a.safetensors")
    out = tmp_path / "merged.safetensors"
    main = sdxl_merge_lora.main if family == "sdxl" else merge_lora.main
    main(["--sd_model", str(base), "--models", lora_path, "--ratios", "0.7", "--save_to", str(out)])

    te_arg = text_encoder_arg(models)
    net, sd = lora.create_network_from_weights(0.7, lora_path, None, te_arg, models.unet)
    net.apply_to(te_arg, models.unet)
    net.load_state_dict(sd, strict=False)
    expected = _outputs(models)
    merged = load_models(str(out), sdxl=family == "sdxl")
    for got, want in zip(_outputs(merged), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(load_file(str(base)).keys()) <= set(load_file(str(out)).keys())  # source keys preserved
    header, _ = _header_and_data(out)
    assert header["__metadata__"]["modelspec.merged_from"] == f"{family}, a"


# ------------------------------------------------------------------------------ LoRA + LoRA

def test_lora_lora_merge_formula_is_quadratic_in_ratio(tiny, tmp_path, caplog):
    models = tiny("sd1")
    a = _write_lora(models, tmp_path / "a.safetensors", seed=1, alpha=2.0)
    b = _write_lora(models, tmp_path / "b.safetensors", seed=2, alpha=8.0)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--models", a, b, "--ratios", "0.5", "-0.8", "--save_to", str(out)])
    assert "quadratic" in caplog.text
    sa, sb, so = load_file(a), load_file(b), load_file(str(out))
    for name in complete_modules(sa, a):
        base = float(sa[f"{name}.alpha"])
        s1 = math.sqrt(float(sa[f"{name}.alpha"]) / base) * 0.5
        s2 = math.sqrt(float(sb[f"{name}.alpha"]) / base) * -0.8
        down = s1 * sa[f"{name}.lora_down.weight"] + s2 * sb[f"{name}.lora_down.weight"]
        up = abs(s1) * sa[f"{name}.lora_up.weight"] + abs(s2) * sb[f"{name}.lora_up.weight"]
        torch.testing.assert_close(so[f"{name}.lora_down.weight"], down)
        torch.testing.assert_close(so[f"{name}.lora_up.weight"], up)
        assert float(so[f"{name}.alpha"]) == base
    meta = _assert_hash_matches_file(out)
    assert meta["ss_network_dim"] == "Dynamic" or meta["ss_network_dim"] in ("4", "2")
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.merged_from"] == "a, b"

    # one model alone: its delta comes out scaled by ratio*|ratio|, not ratio
    single = tmp_path / "single.safetensors"
    merge_lora.main(["--models", b, "--ratios", "-0.5", "--save_to", str(single)])
    for name, delta in _deltas(single).items():
        torch.testing.assert_close(delta, -0.25 * _deltas(b)[name], atol=1e-6, rtol=1e-5)


def test_lora_lora_concat_has_no_cross_terms(tiny, tmp_path):
    models = tiny("sd1")
    a = _write_lora(models, tmp_path / "a.safetensors", seed=1, dim=4, alpha=2.0, conv_dim=None)
    b = _write_lora(models, tmp_path / "b.safetensors", seed=2, dim=2, alpha=4.0, conv_dim=None)
    out = tmp_path / "cat.safetensors"
    merge_lora.main(["--models", a, b, "--ratios", "1.0", "0.5", "--concat", "--save_to", str(out),
                     "--save_precision", "fp16"])
    da, db, do = _deltas(a), _deltas(b), _deltas(out)
    for name in da:
        # contribution_i = ratio·|ratio|·(alpha_i/rank_i)·up@down · rank_i/Σrank
        want = da[name] * 1.0 * (4 / 6) + db[name] * 0.25 * (2 / 6)
        torch.testing.assert_close(do[name], want, atol=2e-3, rtol=2e-2)
    meta = _assert_hash_matches_file(out)  # hashed after the fp16 cast (pitfall 6 fixed)
    assert meta["ss_network_dim"] == "6"
    assert all(v.dtype == torch.float16 for v in load_file(str(out)).values())


# ------------------------------------------------------------------------------ extract

def _low_rank(out_dim: int, in_dim: int, singular_values: list[float], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_dim, len(singular_values), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(in_dim, len(singular_values), generator=gen))
    return u @ torch.diag(torch.tensor(singular_values)) @ v.T


def _tuned_pair(tmp_path):
    """A tiny SD1 file and a "fine-tuned" copy with known low-rank deltas on a few layers."""
    paths = write_tiny_model("sd1", tmp_path / "org", formats=("safetensors",))
    models = load_models(str(paths["safetensors"]))
    blocks = models.unet.down_blocks[0]
    linear = blocks.attentions[0].transformer_blocks[0].attn1.to_q
    conv = blocks.resnets[0].conv1
    te_layer = next(m for n, m in models.text_encoders[0].named_modules() if n.endswith("encoder.layers.0.mlp.fc1"))
    deltas = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
              _low_rank(*linear.weight.shape, [3.0, 2.0, 1.0], 0),
              "lora_unet_down_blocks_0_resnets_0_conv1":
              _low_rank(conv.weight.shape[0], conv.weight[0].numel(), [2.0, 1.0], 1).reshape(conv.weight.shape),
              "lora_te_text_model_encoder_layers_0_mlp_fc1": _low_rank(*te_layer.weight.shape, [1.0, 0.5], 2)}
    with torch.no_grad():
        for layer, name in ((linear, 0), (conv, 1), (te_layer, 2)):
            layer.weight += list(deltas.values())[name]
    from library.models.saving import save_ldm_checkpoint

    tuned = tmp_path / "tuned.safetensors"
    save_ldm_checkpoint(models, str(tuned))
    return paths["safetensors"], tuned, deltas


def test_extract_then_merge_reproduces_tuned_model(tmp_path):
    org, tuned, deltas = _tuned_pair(tmp_path)
    out = tmp_path / "extracted.safetensors"
    extract_lora_from_models.main(["--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(out),
                                   "--dim", "3", "--conv_dim", "2", "--clamp_quantile", "1.0"])
    meta = _assert_hash_matches_file(out)
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "3.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    extracted = _deltas(out)
    for name, delta in deltas.items():
        torch.testing.assert_close(extracted[name], delta, atol=1e-5, rtol=0)

    merged = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(org), "--models", str(out), "--ratios", "1", "--save_to", str(merged)])
    want, got = load_file(str(tuned)), load_file(str(merged))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0)


def test_extract_at_lower_rank_loses_the_discarded_singular_values(tmp_path):
    org, tuned, deltas = _tuned_pair(tmp_path)
    out = tmp_path / "rank2.safetensors"
    extract_lora_from_models.main(["--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(out),
                                   "--dim", "2", "--clamp_quantile", "1.0", "--min_diff", "10"])
    extracted = _deltas(out)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float((extracted[name] - deltas[name]).norm()) == pytest.approx(1.0, abs=1e-5)  # σ_3 = 1
    assert not any(k.startswith("lora_te") for k in extracted)  # TE change 1.0 < --min_diff 10
    assert "lora_unet_down_blocks_0_resnets_0_conv1" not in extracted  # no --conv_dim: 3x3 skipped


# ------------------------------------------------------------------------------ resize

def test_dynamic_rank_formulas_on_constructed_spectrum():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    assert dynamic_rank(s, "sv_ratio", 4.0, 8) == 3  # #{σ > 2.5} = 2, +1
    assert dynamic_rank(s, "sv_cumulative", 0.9, 8) == 4  # cumsum/Σ: .54 .81 .91 -> index 2, +1, +1
    assert dynamic_rank(s, "sv_fro", 0.95, 8) == 3  # cumsum(σ²)/Σσ²: .768 .960 -> index 1 (p²=.9025), +1, +1
    assert dynamic_rank(s, "sv_ratio", 4.0, 2) == 2  # capped at the maximum rank
    assert dynamic_rank(s, None, None, 5) == 5
    assert dynamic_rank(torch.zeros(6), "sv_ratio", 4.0, 8) == 1  # zero matrix
    assert dynamic_rank(s, "sv_ratio", 1000.0, 8) == 6  # clamped to len-1, +1


def _spectrum_lora(path, spectrum: list[float]) -> str:
    """One Linear module whose up@down has exactly the given singular values (alpha = rank)."""
    full = _low_rank(16, 12, spectrum, 5)
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    r = len(spectrum)
    save_file({"lora_unet_x.lora_up.weight": (u[:, :r] @ torch.diag(s[:r])).contiguous(),
               "lora_unet_x.lora_down.weight": vh[:r].contiguous(), "lora_unet_x.alpha": torch.tensor(float(r))},
              str(path))
    return str(path)


@pytest.mark.parametrize("method,param,rank", [("sv_ratio", 4.0, 3), ("sv_cumulative", 0.9, 4), ("sv_fro", 0.95, 3)])
def test_resize_dynamic_picks_formula_rank(tmp_path, method, param, rank):
    src = _spectrum_lora(tmp_path / "s.safetensors", [10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    out = tmp_path / "r.safetensors"
    resize_lora.main(["--model", src, "--save_to", str(out), "--new_rank", "8", "--dynamic_method", method,
                      "--dynamic_param", str(param)])
    sd = load_file(str(out))
    assert sd["lora_unet_x.lora_down.weight"].shape[0] == rank
    assert float(sd["lora_unet_x.alpha"]) == pytest.approx(rank)  # scale 1 kept: (6/6)·rank
    meta = _assert_hash_matches_file(out)
    assert meta["ss_network_dim"] == "Dynamic"
    assert meta["ss_training_comment"] == f"Dynamic resize with {method}: {param} from 6; "


def test_resize_reports_the_error_it_causes(tiny, tmp_path, capsys):
    models = tiny("sd1")
    src = _write_lora(models, tmp_path / "a.safetensors", dim=4, alpha=2.0,
                      metadata={"ss_training_comment": "hello", "ss_network_dim": "4"})
    out = tmp_path / "small.safetensors"
    resize_lora.main(["--model", src, "--save_to", str(out), "--new_rank", "2", "--new_conv_rank", "1",
                      "--save_precision", "fp16", "--verbose"])
    reported = {m.group(1): float(m.group(2)) for m in
                re.finditer(r"^(\S+)\s+\|.*rel\. error: (\S+)", capsys.readouterr().out, re.M)}
    before, after = _deltas(src), _deltas(out)
    assert reported.keys() == before.keys()
    for name, delta in before.items():
        independent = float((delta - after[name]).norm() / delta.norm())
        assert reported[name] == pytest.approx(independent, rel=1e-4, abs=1e-7), name
    meta = _assert_hash_matches_file(out)  # fp16 file, hashed after the cast
    assert meta["ss_training_comment"] == "dimension is resized from 4 to 2 (conv: 1); hello"
    assert meta["ss_network_dim"] == "2"
    sd = load_file(str(out))
    assert float(sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == pytest.approx(1 * 1 / 2)  # scale kept


# ------------------------------------------------------------------------------ svd merge

def test_svd_merge_formula(tiny, tmp_path):
    models = tiny("sd1")
    a = _write_lora(models, tmp_path / "a.safetensors", seed=1, alpha=2.0)
    b = _write_lora(models, tmp_path / "b.safetensors", seed=2, alpha=8.0)
    out = tmp_path / "svd.safetensors"
    svd_merge_lora.main(["--models", a, b, "--ratios", "0.5", "-0.8", "--new_rank", "3", "--new_conv_rank", "2",
                         "--save_to", str(out)])
    da, db, sd = _deltas(a), _deltas(b), load_file(str(out))
    for name in da:
        total = 0.5 * da[name] - 0.8 * db[name]  # linear in the ratios
        mat = total.flatten(1) if total.ndim == 4 else total
        is_kxk = total.ndim == 4 and total.shape[-1] != 1
        assert_clamped_svd_factors(sd, name, total, min(2 if is_kxk else 3, *mat.shape))
    meta = _assert_hash_matches_file(out)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 2, "conv_alpha": 2}
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "3"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


# ------------------------------------------------------------------------------ check

def test_check_lora_weights_lines(tiny, tmp_path, capsys):
    src = _write_lora(tiny("sd1"), tmp_path / "a.safetensors")
    sd = load_file(src)
    check_lora_weights.main([src])
    lines = capsys.readouterr().out.splitlines()
    n_lora = sum("lora_up" in k or "lora_down" in k for k in sd)
    assert lines[0] == f"number of LoRA modules: {n_lora}"
    assert len(lines) == 1 + n_lora
    key, shape, mean, low = lines[1].split(",")
    assert shape == str(tuple(sd[key].shape)).replace(", ", "-")
    assert float(mean) == pytest.approx(float(sd[key].abs().mean()))
    assert float(low) == pytest.approx(float(sd[key].abs().min()))

    check_lora_weights.main([src, "-s"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"number of all modules: {len(sd)}"
    keys = [line.split(",")[0] for line in lines[2:]]
    assert sorted(keys) == sorted(sd) and len(keys) == len(set(keys))  # each key once
    assert any(line.startswith("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha,(),") for line in lines)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("tool,argv,needle", [
    (merge_lora, ["--models", "{a}", "--ratios", "1", "2", "--save_to", "{out}"], "--ratios"),
    (merge_lora, ["--models", "{tmp}/missing.safetensors", "--ratios", "1", "--save_to", "{out}"], "missing"),
    (resize_lora, ["--model", "{a}", "--save_to", "{tmp}/out.bin"], "--save_to"),
    (resize_lora, ["--model", "{a}", "--save_to", "{out}", "--dynamic_method", "sv_fro"], "--dynamic_param"),
    (svd_merge_lora, ["--models", "{a}", "{tmp}/nope.ckpt", "--ratios", "1", "1", "--save_to", "{out}"], "nope"),
    (extract_lora_from_models, ["--model_org", "{a}", "--model_tuned", "{a}", "--save_to", "{out}", "--v2",
                                "--sdxl"], "--sdxl"),
])
def test_bad_input_exits_2_without_output(tiny, tmp_path, capsys, tool, argv, needle):
    a = _write_lora(tiny("sd1"), tmp_path / "a.safetensors")
    out = tmp_path / "out.safetensors"
    argv = [x.format(a=a, out=out, tmp=tmp_path) for x in argv]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
