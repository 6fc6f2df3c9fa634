"""networks/flux_merge_lora.py and networks/flux_extract_lora.py on the tiny FLUX.1 dev files.

Oracles: the merge formula ``W + ratio · alpha/rank · up @ down`` written out per BFL key from the raw tensors
(the LoRA module name is ``lora_unet_`` + the key's path with ``_``, as sd-scripts builds it); diffusers'
``FluxPipeline.load_lora_weights`` (PEFT layers on the unmerged model) for outputs; for extraction, a known
low-rank delta. diffusers' kohya converter splits ``linear1`` by the released widths only, so files given to
diffusers leave ``linear1`` out (see test_lora_flux_oracle.py); the formula test covers ``linear1``.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.models.flux_loading import load_clip_l, load_flux_transformer
from networks import flux_extract_lora, flux_merge_lora, lora_flux
from tests.networks.flux_helpers import (peft_deltas, pipeline, randomize, run_transformer, save_peft_lora,
                                         tiny_flux_models)
from tests.networks.test_lora_flux_oracle import clip_out

NO_LINEAR1 = r"single_blocks_\d+_linear1=0"


def write_lora(path, dim, alpha, seed, **network_args) -> str:
    """A random FLUX.1 LoRA of the tiny dev model (sd-scripts' format) written by networks.lora_flux."""
    m = tiny_flux_models()
    network = lora_flux.create_network(1.0, dim, alpha, m.ae, [m.clip_l, m.t5xxl], m.transformer, **network_args)
    randomize(network, seed=seed)
    network.save_weights(str(path), None, {"modelspec.title": path.stem})
    return str(path)


def hand_merged(base: dict, loras: list[tuple[dict, float]], prefix: str) -> tuple[dict, set]:
    """``W + Σ ratio · alpha/rank · up @ down`` for every key a LoRA module names; returns (weights, keys)."""
    out, touched = dict(base), set()
    for key in base:
        name = prefix + key[: -len(".weight")].replace(".", "_")
        for sd, ratio in loras:
            if f"{name}.lora_down.weight" not in sd:
                continue
            down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
            alpha = float(sd[f"{name}.alpha"])
            out[key] = out[key] + ratio * alpha / down.shape[0] * (up @ down)
            touched.add(key)
    return out, touched


def test_merge_into_model_files_is_the_formula(tiny_flux, tmp_path):
    files = tiny_flux["dev"]
    a = write_lora(tmp_path / "a.safetensors", 4, 2.0, 0, train_t5xxl="True")
    b = write_lora(tmp_path / "b.safetensors", 2, 1.0, 1, train_blocks="double")
    out = {part: tmp_path / f"merged_{part}.safetensors" for part in ("transformer", "clip_l", "t5xxl")}
    flux_merge_lora.main(["--flux_model", str(files["transformer"]), "--clip_l", str(files["clip_l"]),
                          "--t5xxl", str(files["t5xxl"]), "--save_to", str(out["transformer"]),
                          "--clip_l_save_to", str(out["clip_l"]), "--t5xxl_save_to", str(out["t5xxl"]),
                          "--models", a, b, "--ratios", "0.7", "-0.4"])
    loras = [(load_file(a), 0.7), (load_file(b), -0.4)]
    for part, prefix, n_modules in (("transformer", "lora_unet_", 2 * 10 + 2 * 3), ("clip_l", "lora_te1_", 18),
                                    ("t5xxl", "lora_te3_", 2 * 7)):
        base, got = load_file(str(files[part])), load_file(str(out[part]))
        want, touched = hand_merged(base, loras, prefix)
        assert sorted(got) == sorted(base) and len(touched) == n_modules
        for key in base:
            if key in touched:
                torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
                assert (got[key] - base[key]).abs().max() > 1e-3
            else:
                assert got[key].dtype == base[key].dtype and torch.equal(got[key], base[key]), key
    merged = load_file(str(out["transformer"]))
    for key in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.1.txt_attn.qkv.weight",
                "single_blocks.0.linear1.weight"):  # fused layers: one weight, the whole formula
        assert key in hand_merged(load_file(str(files["transformer"])), loras, "lora_unet_")[1]
        assert merged[key].shape[0] > merged[key].shape[1]
    with safe_open(str(out["transformer"]), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev"
    assert meta["modelspec.merged_from"] == "flux-dev, a, b"


def test_merge_save_precision_casts_every_tensor(tiny_flux, tmp_path):
    """--save_precision applies to every tensor (upstream); BFL's .sft name is read and written as safetensors."""
    sft = tmp_path / "flux1-dev.sft"
    shutil.copy(tiny_flux["dev"]["transformer"], sft)
    a = write_lora(tmp_path / "a.safetensors", 4, 4.0, 0)
    out = tmp_path / "merged.sft"
    flux_merge_lora.main(["--flux_model", str(sft), "--save_to", str(out), "--models", a,
                          "--ratios", "1", "--save_precision", "bf16", "--no_metadata"])
    base, got = load_file(str(sft)), load_file(str(out))
    want, touched = hand_merged(base, [(load_file(a), 1.0)], "lora_unet_")
    for key in base:
        assert got[key].dtype == torch.bfloat16
        assert torch.equal(got[key], want[key].to(torch.bfloat16)) or key in touched
        if key in touched:
            torch.testing.assert_close(got[key].float(), want[key], rtol=1e-2, atol=1e-2)
    with safe_open(str(out), "pt") as f:
        assert not f.metadata()


def test_merged_model_gives_diffusers_output(tiny_flux, tmp_path):
    """The merged files against the unmerged model with the LoRA loaded by diffusers (PEFT layers)."""
    files = tiny_flux["dev"]
    lora = write_lora(tmp_path / "a.safetensors", 4, 2.0, 0, network_reg_dims=NO_LINEAR1)
    out, clip_to = tmp_path / "merged.safetensors", tmp_path / "merged_clip_l.safetensors"
    flux_merge_lora.main(["--flux_model", str(files["transformer"]), "--clip_l", str(files["clip_l"]),
                          "--save_to", str(out), "--clip_l_save_to", str(clip_to), "--models", lora,
                          "--ratios", "1.0"])
    ref = tiny_flux_models()
    base = run_transformer(ref.transformer)
    pipeline(ref).load_lora_weights(lora)
    want = run_transformer(ref.transformer)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(run_transformer(load_flux_transformer(str(files["transformer"]))), base)
    torch.testing.assert_close(run_transformer(load_flux_transformer(str(out))), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clip_out(load_clip_l(str(clip_to))), clip_out(ref.clip_l), rtol=1e-4, atol=1e-5)


def test_merge_diffusers_format_lora(tiny_flux, tmp_path):
    """A PEFT LoRA saved by FluxPipeline.save_lora_weights (own rank per q / k / v part, linear1 parts too)."""
    ref = tiny_flux_models()
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "attn.add_k_proj", "ff.net.2", "norm1.linear"]
    path = save_peft_lora(ref.transformer, targets, tmp_path)
    want = run_transformer(ref.transformer)
    out = tmp_path / "merged.safetensors"
    flux_merge_lora.main(["--flux_model", str(tiny_flux["dev"]["transformer"]), "--save_to", str(out),
                          "--models", str(path), "--ratios", "1",
                          "--diffusers"])
    assert (want - run_transformer(tiny_flux_models().transformer)).abs().max() > 1e-3
    torch.testing.assert_close(run_transformer(load_flux_transformer(str(out))), want, rtol=1e-4, atol=1e-5)


def test_merge_loras_into_one(tmp_path):
    """sd-scripts' LoRA+LoRA: factors scaled by s = sqrt(alpha_i / alpha_first) · ratio (up by |s|); --concat
    stacks the ranks and keeps the first file's alpha."""
    a = write_lora(tmp_path / "a.safetensors", 4, 2.0, 0, train_blocks="double")
    b = write_lora(tmp_path / "b.safetensors", 2, 0.5, 1, train_blocks="double")
    out = tmp_path / "ab.safetensors"
    flux_merge_lora.main(["--save_to", str(out), "--models", a, b, "--ratios", "1.0", "-0.5", "--concat"])
    sa, sb, got = load_file(a), load_file(b), load_file(str(out))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    s_b = (0.5 / 2.0) ** 0.5 * -0.5
    down = torch.cat([sa[f"{name}.lora_down.weight"], sb[f"{name}.lora_down.weight"] * s_b])
    up = torch.cat([sa[f"{name}.lora_up.weight"], sb[f"{name}.lora_up.weight"] * abs(s_b)], dim=1)
    torch.testing.assert_close(got[f"{name}.lora_down.weight"], down)
    torch.testing.assert_close(got[f"{name}.lora_up.weight"], up)
    assert float(got[f"{name}.alpha"]) == 2.0 and sorted(got) == sorted(sa)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_dim"] == "6" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["sshs_model_hash"]


def _rank_delta(shape, rank, seed) -> torch.Tensor:
    """A rank-``rank`` delta whose singular vectors hold each value with both signs: the clamp to
    [-q, q] at quantile 1 (q = the largest value, as sd-scripts) then cuts nothing, whatever signs the SVD picks."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape[0] // 2, rank, generator=gen)
    b = torch.randn(rank, shape[1] // 2, generator=gen)
    return torch.cat([a, -a]) @ torch.cat([b, -b], dim=1) * 0.05


def test_extract_reproduces_a_low_rank_delta(tiny_flux, tmp_path):
    org = tiny_flux["dev"]["transformer"]
    weights = load_file(str(org))
    deltas = {"double_blocks.0.img_attn.qkv.weight": 2, "double_blocks.1.img_mlp.0.weight": 3,
              "single_blocks.1.linear1.weight": 2, "single_blocks.0.modulation.lin.weight": 1}
    tuned = dict(weights)
    for i, (key, rank) in enumerate(deltas.items()):
        tuned[key] = weights[key] + _rank_delta(weights[key].shape, rank, i)
    tuned_path, out = tmp_path / "tuned.safetensors", tmp_path / "x.safetensors"
    save_file(tuned, str(tuned_path))
    flux_extract_lora.main(["--model_org", str(org), "--model_tuned", str(tuned_path), "--save_to", str(out),
                            "--dim", "4", "--clamp_quantile", "1.0"])
    sd = load_file(str(out))
    layers = [f"double_blocks.{i}.{n}" for i in range(2) for n in ("img_mod.lin", "img_attn.qkv", "img_attn.proj",
                                                                      "img_mlp.0", "img_mlp.2", "txt_mod.lin",
                                                                      "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0",
                                                                      "txt_mlp.2")]
    layers += [f"single_blocks.{i}.{n}" for i in range(2) for n in ("linear1", "linear2", "modulation.lin")]
    assert sorted(sd) == sorted(f"lora_unet_{p.replace('.', '_')}.{t}" for p in layers
                                for t in ("alpha", "lora_down.weight", "lora_up.weight"))
    for path in layers:
        name, key = f"lora_unet_{path.replace('.', '_')}", path + ".weight"
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        assert down.shape[0] == 4 and float(sd[f"{name}.alpha"]) == 4.0
        torch.testing.assert_close(up @ down * (float(sd[f"{name}.alpha"]) / down.shape[0]),
                                   tuned[key] - weights[key], rtol=1e-4, atol=2e-5)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and json.loads(meta["ss_network_args"]) == {}
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["sshs_model_hash"]

    # diffusers reads it (every module but linear1, see above) and its PEFT layers add the deltas
    for_diffusers = tmp_path / "no_linear1.safetensors"
    save_file({k: v for k, v in sd.items() if "linear1" not in k}, str(for_diffusers))
    ref = tiny_flux_models()
    pipeline(ref).load_lora_weights(str(for_diffusers))
    got = peft_deltas(ref.transformer)
    assert len(got) == 2 * (8 + 2 * 3) + 2 * 2  # qkv parts split: 14 layers per double block, 2 per single
    qkv = (tuned["double_blocks.0.img_attn.qkv.weight"] - weights["double_blocks.0.img_attn.qkv.weight"]).chunk(3)
    for part, delta in zip(("to_q", "to_k", "to_v"), qkv):
        torch.testing.assert_close(got[f"transformer_blocks.0.attn.{part}"], delta, rtol=1e-4, atol=2e-5)
    mlp = tuned["double_blocks.1.img_mlp.0.weight"] - weights["double_blocks.1.img_mlp.0.weight"]
    torch.testing.assert_close(got["transformer_blocks.1.ff.net.0.proj"], mlp, rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------------------ refusals

@pytest.fixture
def bad_inputs(tiny_flux, tiny, tmp_path_factory):
    """Paths the refusal cases format into their argv: FLUX files, a FLUX LoRA, an SD LoRA, an SD checkpoint, a
    LoRA of other widths, a tuned model of other widths, a diffusers-format LoRA."""
    from library.models.saving import save_ldm_checkpoint
    from tests.networks.helpers import write_lora as write_sd_lora

    root = tmp_path_factory.mktemp("bad")
    files = tiny_flux["dev"]
    sd1 = tiny("sd1")
    paths = {"flux": str(files["transformer"]), "clip": str(files["clip_l"]), "t5": str(files["t5xxl"]),
             "lora": write_lora(root / "a.safetensors", 2, 1.0, 0),
             "sd_lora": write_sd_lora(sd1, root / "sd_lora.safetensors"), "sd_model": str(root / "sd1.safetensors")}
    save_ldm_checkpoint(sd1, paths["sd_model"])
    wide = {k: torch.cat([v, v], dim=1) if k.endswith("lora_down.weight") else v
            for k, v in load_file(paths["lora"]).items()}
    paths["wide_lora"] = str(root / "wide.safetensors")
    save_file(wide, paths["wide_lora"])
    tuned = load_file(paths["flux"])
    tuned["double_blocks.0.img_mlp.0.weight"] = tuned["double_blocks.0.img_mlp.0.weight"][:-1]
    paths["bad_tuned"] = str(root / "bad_tuned.safetensors")
    save_file(tuned, paths["bad_tuned"])
    peft = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2)}
    paths["peft"] = str(root / "peft.safetensors")
    save_file(peft, paths["peft"])
    return paths


MERGE = flux_merge_lora
EXTRACT = flux_extract_lora


@pytest.mark.parametrize("tool,argv,needle", [
    (MERGE, ["--flux_model", "{flux}", "--save_to", "{out}", "--models", "{tmp}/missing.safetensors",
             "--ratios", "1"], "missing.safetensors"),
    (MERGE, ["--flux_model", "{tmp}/nope.safetensors", "--save_to", "{out}", "--models", "{lora}", "--ratios", "1"],
     "nope.safetensors"),
    (MERGE, ["--flux_model", "{sd_model}", "--save_to", "{out}", "--models", "{lora}", "--ratios", "1"],
     "sd1.safetensors: not a FLUX.1 transformer"),
    (MERGE, ["--flux_model", "{flux}", "--save_to", "{out}", "--models", "{sd_lora}", "--ratios", "1"],
     "sd_lora.safetensors is an SD1 LoRA"),
    (MERGE, ["--save_to", "{out}", "--models", "{lora}", "{sd_lora}", "--ratios", "1", "1"], "SD1 LoRA"),
    (MERGE, ["--flux_model", "{flux}", "--save_to", "{out}", "--models", "{wide_lora}", "--ratios", "1"],
     "wide.safetensors: module"),
    (MERGE, ["--flux_model", "{flux}", "--clip_l", "{t5}", "--save_to", "{out}", "--clip_l_save_to",
             "{tmp}/c.safetensors", "--models", "{lora}", "--ratios", "1"], "--clip_l"),
    (MERGE, ["--flux_model", "{flux}", "--clip_l", "{clip}", "--save_to", "{out}", "--models", "{lora}",
             "--ratios", "1"], "--clip_l_save_to"),
    (MERGE, ["--flux_model", "{flux}", "--save_to", "{out}", "--models", "{lora}", "--ratios", "1", "2"],
     "--ratios"),
    (MERGE, ["--flux_model", "{flux}", "--save_to", "{out}", "--models", "{lora}", "--ratios", "1",
             "--mem_eff_load_save"], "--mem_eff_load_save"),
    (MERGE, ["--flux_model", "{flux}", "--save_to", "{out}", "--models", "{lora}", "--ratios", "1",
             "--precision", "fp8"], "--precision"),
    (MERGE, ["--flux_model", "{flux}", "--save_to", "{out}", "--models", "{lora}", "--ratios", "1", "--concat"],
     "--concat"),
    (MERGE, ["--save_to", "{out}", "--models", "{peft}", "--ratios", "1"], "--flux_model"),
    (MERGE, ["--clip_l", "{clip}", "--clip_l_save_to", "{tmp}/c.safetensors", "--save_to", "{out}",
             "--models", "{lora}", "--ratios", "1"], "no --flux_model"),
    (MERGE, ["--flux_model", "{flux}", "--save_to", "{tmp}/merged.ckpt", "--models", "{lora}", "--ratios", "1"],
     "name a .safetensors or .sft file"),
    (MERGE, ["--flux_model", "{flux}", "--save_to", "{out}", "--models", "{lora}", "--ratios", "1",
             "--working_device", "gpu0"], "--working_device"),
    (EXTRACT, ["--model_org", "{flux}", "--model_tuned", "{flux}", "--save_to", "{out}", "--device", "gpu0"],
     "--device"),
    (EXTRACT, ["--model_org", "{flux}", "--model_tuned", "{tmp}/nope.safetensors", "--save_to", "{out}"],
     "nope.safetensors"),
    (EXTRACT, ["--model_org", "{sd_model}", "--model_tuned", "{flux}", "--save_to", "{out}"],
     "--model_org {sd_model}: not a FLUX.1 transformer"),
    (EXTRACT, ["--model_org", "{flux}", "--model_tuned", "{bad_tuned}", "--save_to", "{out}"],
     "double_blocks.0.img_mlp.0.weight has shape"),
    (EXTRACT, ["--model_org", "{flux}", "--model_tuned", "{flux}", "--save_to", "{out}", "--mem_eff_safe_open"],
     "--mem_eff_safe_open"),
    (EXTRACT, ["--model_org", "{flux}", "--model_tuned", "{flux}", "--save_to", "{out}", "--clamp_quantile", "0"],
     "--clamp_quantile"),
])
def test_bad_input_exits_2_before_writing(bad_inputs, tmp_path, capsys, tool, argv, needle):
    out = tmp_path / "out.safetensors"
    fmt = dict(bad_inputs, out=out, tmp=tmp_path)
    argv = [x.format(**fmt) for x in argv]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle.format(**fmt) in err[0], err
    assert list(tmp_path.iterdir()) == []
