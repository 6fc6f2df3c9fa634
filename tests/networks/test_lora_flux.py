"""FLUX.1 LoRA (networks.lora_flux): names and shapes, the fused modules, round trip, bad files and options.

Expected names follow upstream's rule (networks/lora_flux.py): ``lora_unet_`` + the BFL path of every Linear in a
DoubleStreamBlock / SingleStreamBlock (and the embedders with ``in_dims``), ``lora_te1_`` + the CLIP-L path,
``lora_te3_`` + the T5 path; written out here for the tiny model (width 64, MLP 256, 2 + 2 blocks, CLIP 3 layers).
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.formats.flux_metadata import flux_lora_metadata
from networks import lora_flux
from networks.lora_family import check_lora_matches, lora_file_family
from tests.networks.flux_helpers import randomize, run_transformer, tiny_flux_models

W, MLP, CLIP, CLIP_MLP, T5, T5_FF = 64, 256, 32, 64, 32, 64
DOUBLE = {"img_mod_lin": (6 * W, W), "img_attn_qkv": (3 * W, W), "img_attn_proj": (W, W), "img_mlp_0": (MLP, W),
          "img_mlp_2": (W, MLP), "txt_mod_lin": (6 * W, W), "txt_attn_qkv": (3 * W, W), "txt_attn_proj": (W, W),
          "txt_mlp_0": (MLP, W), "txt_mlp_2": (W, MLP)}
SINGLE = {"linear1": (3 * W + MLP, W), "linear2": (W, W + MLP), "modulation_lin": (3 * W, W)}
CLIP_LAYERS = {"self_attn_q_proj": (CLIP, CLIP), "self_attn_k_proj": (CLIP, CLIP), "self_attn_v_proj": (CLIP, CLIP),
               "self_attn_out_proj": (CLIP, CLIP), "mlp_fc1": (CLIP_MLP, CLIP), "mlp_fc2": (CLIP, CLIP_MLP)}
T5_LAYERS = {"layer_0_SelfAttention_q": (T5, T5), "layer_0_SelfAttention_k": (T5, T5),
             "layer_0_SelfAttention_v": (T5, T5), "layer_0_SelfAttention_o": (T5, T5),
             "layer_1_DenseReluDense_wi_0": (T5_FF, T5), "layer_1_DenseReluDense_wi_1": (T5_FF, T5),
             "layer_1_DenseReluDense_wo": (T5, T5_FF)}
# (img, time, vector, guidance, txt) embedders: time/guidance read 256 sinusoidal features, vector the CLIP pool
IN_LAYERS = {"img_in": (W, 64), "time_in_in_layer": (W, 256), "time_in_out_layer": (W, W),
             "vector_in_in_layer": (W, CLIP), "vector_in_out_layer": (W, W), "guidance_in_in_layer": (W, 256),
             "guidance_in_out_layer": (W, W), "txt_in": (W, T5)}


def expected(rank: int, double=(0, 1), single=(0, 1), t5=False, in_layers=()) -> dict[str, tuple]:
    layers = {f"lora_te1_text_model_encoder_layers_{i}_{n}": s for i in range(3) for n, s in CLIP_LAYERS.items()}
    if t5:
        layers.update({f"lora_te3_encoder_block_{i}_{n}": s for i in range(2) for n, s in T5_LAYERS.items()})
    layers.update({f"lora_unet_double_blocks_{i}_{n}": s for i in double for n, s in DOUBLE.items()})
    layers.update({f"lora_unet_single_blocks_{i}_{n}": s for i in single for n, s in SINGLE.items()})
    layers.update({f"lora_unet_{n}": IN_LAYERS[n] for n in in_layers})
    shapes = {}
    for name, (out_dim, in_dim) in layers.items():
        shapes.update({f"{name}.alpha": (), f"{name}.lora_down.weight": (rank, in_dim),
                       f"{name}.lora_up.weight": (out_dim, rank)})
    return shapes


def shapes_of(network) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def make(m, dim=4, alpha=2.0, **args):
    return lora_flux.create_network(1.0, dim, alpha, m.ae, [m.clip_l, m.t5xxl], m.transformer, **args)


def test_default_names_and_shapes():
    m = tiny_flux_models()
    network = make(m)
    assert shapes_of(network) == expected(4)
    assert all(float(v) == 2.0 for k, v in network.state_dict().items() if k.endswith(".alpha"))


@pytest.mark.parametrize("args, want", [
    (dict(train_t5xxl="True", in_dims="[4, 4, 4, 4, 4]"), dict(t5=True, in_layers=tuple(IN_LAYERS))),
    (dict(train_blocks="single"), dict(double=())),
    (dict(train_blocks="double", train_single_block_indices="1"), dict(single=())),
    (dict(train_double_block_indices="1", train_single_block_indices="0-1"), dict(double=(1,))),
    (dict(in_dims="[4,0,0,0,4]"), dict(in_layers=("img_in", "txt_in"))),
])
def test_selected_layers(args, want):
    m = tiny_flux_models()
    assert shapes_of(make(m, **args)) == expected(4, **want)


def test_type_and_regex_ranks():
    m = tiny_flux_models()
    shapes = shapes_of(make(m, img_attn_dim="2", single_dim="0", network_reg_dims="txt_mlp_0=3"))
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] == (2, W)
    assert shapes["lora_unet_double_blocks_1_img_attn_proj.lora_up.weight"] == (W, 2)
    assert shapes["lora_unet_double_blocks_0_txt_mlp_0.lora_down.weight"] == (3, W)
    assert "lora_unet_single_blocks_0_linear1.alpha" not in shapes  # single_dim=0: linear1, linear2 left out
    assert "lora_unet_single_blocks_0_linear2.alpha" not in shapes
    assert shapes["lora_unet_single_blocks_0_modulation_lin.lora_down.weight"] == (4, W)


def test_fused_module_is_the_fused_layers_lora():
    """img_attn.qkv / linear1 on diffusers' split layers add exactly what a LoRA on BFL's fused layer adds."""
    m = tiny_flux_models()
    network = make(m)
    randomize(network)
    base = m.transformer.single_transformer_blocks[0]
    lora = getattr(network, "lora_unet_single_blocks_0_linear1")
    x = torch.randn(2, 5, W)
    fused_weight = torch.cat([base.attn.to_q.weight, base.attn.to_k.weight, base.attn.to_v.weight,
                              base.proj_mlp.weight])
    fused_bias = torch.cat([base.attn.to_q.bias, base.attn.to_k.bias, base.attn.to_v.bias, base.proj_mlp.bias])
    delta = lora.lora_up.weight @ lora.lora_down.weight * (2.0 / 4)
    want = torch.nn.functional.linear(x, fused_weight + delta, fused_bias)
    network.apply_to([m.clip_l, m.t5xxl], m.transformer)
    with torch.no_grad():
        got = torch.cat([base.attn.to_q(x), base.attn.to_k(x), base.attn.to_v(x), base.proj_mlp(x)], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def save(m, path, seed=0, **args) -> tuple:
    network = make(m, **args)
    randomize(network, seed)
    network.save_weights(str(path), None, flux_lora_metadata("dev", 4, 2.0, args, {}, title="t", timestamp=0))
    return network


def test_round_trip_and_merge(tmp_path):
    """save -> create_network_from_weights: same tensors; hooks, merge_to and pre_calculation give one output."""
    m = tiny_flux_models()
    path = tmp_path / "flux_lora.safetensors"
    saved = save(m, path, in_dims="[2,2,2,2,2]", train_t5xxl="True")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert "modelspec.prediction_type" not in meta and meta["modelspec.resolution"] == "1024x1024"
    assert lora_file_family(path) == "flux"

    m2 = tiny_flux_models()
    before = run_transformer(m2.transformer)
    network, sd = lora_flux.create_network_from_weights(1.0, str(path), m2.ae, [m2.clip_l, m2.t5xxl], m2.transformer)
    assert shapes_of(network) == shapes_of(saved)
    network.apply_to([m2.clip_l, m2.t5xxl], m2.transformer)
    network.load_weights(str(path))
    for k, v in saved.state_dict().items():
        assert torch.equal(network.state_dict()[k], v), k
    hooked = run_transformer(m2.transformer)
    assert (hooked - before).abs().max() > 1e-3
    network.backup_weights()
    network.pre_calculation()
    torch.testing.assert_close(run_transformer(m2.transformer), hooked, rtol=1e-4, atol=1e-5)
    network.restore_weights()
    torch.testing.assert_close(run_transformer(m2.transformer), hooked, rtol=1e-4, atol=1e-5)  # hooks back on

    m3 = tiny_flux_models()
    merger, sd = lora_flux.create_network_from_weights(1.0, str(path), m3.ae, [m3.clip_l, m3.t5xxl], m3.transformer)
    merger.merge_to([m3.clip_l, m3.t5xxl], m3.transformer, sd)
    torch.testing.assert_close(run_transformer(m3.transformer), hooked, rtol=1e-4, atol=1e-5)


def test_max_norm_and_param_groups():
    m = tiny_flux_models()
    network = make(m, train_t5xxl="True")
    randomize(network, std=1.0)
    keys, _, top = network.apply_max_norm_regularization(0.5, "cpu")
    assert keys > 0 and top <= 0.5 + 1e-5
    groups = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _refused(m, state_dict, path) -> str:
    """The one-line message create_network_from_weights gives for ``state_dict`` saved at ``path``."""
    save_file(state_dict, str(path))
    with pytest.raises(UserError) as e:
        lora_flux.create_network_from_weights(1.0, str(path), m.ae, [m.clip_l, m.t5xxl], m.transformer)
    return _one_line(e)


def test_bad_files_are_one_line(tmp_path):
    m = tiny_flux_models()
    path = tmp_path / "good.safetensors"
    save(m, path)
    sd = load_file(str(path))

    wide = dict(sd)
    wide["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.zeros(3 * 128, 4)
    message = _refused(m, wide, tmp_path / "wide.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv" in message and "(192, 64)" in message

    extra = dict(sd)
    extra["lora_unet_double_blocks_7_img_attn_proj.lora_down.weight"] = torch.zeros(4, W)
    extra["lora_unet_double_blocks_7_img_attn_proj.lora_up.weight"] = torch.zeros(W, 4)
    message = _refused(m, extra, tmp_path / "extra.safetensors")
    assert "lora_unet_double_blocks_7_img_attn_proj" in message and "no layer" in message

    network = make(m)
    with pytest.raises(UserError) as e:
        network.load_weights(str(tmp_path / "wide.safetensors"))
    assert "other widths" in _one_line(e)


def test_flux_file_refused_for_sd_models(tmp_path):
    """gen_img / merge_lora / train_network check a LoRA's family first: a FLUX file is named as FLUX.1."""
    m = tiny_flux_models()
    path = tmp_path / "flux.safetensors"
    save(m, path)
    with pytest.raises(UserError) as e:
        check_lora_matches(path, "sdxl")
    assert "FLUX.1 LoRA but the model is SDXL" in _one_line(e)


@pytest.mark.parametrize("args, words", [
    (dict(split_qkv="True"), "split_qkv"),
    (dict(conv_dim="4"), "conv_dim"),
    (dict(loraplus_lr_ratio="4"), "loraplus_lr_ratio"),
    (dict(train_blocks="some"), "train_blocks"),
    (dict(train_double_block_indices="0,5"), "outside 0-1"),
    (dict(in_dims="[1,2]"), "5 ranks"),
    (dict(network_reg_dims="([=3"), "regular expression"),
])
def test_bad_network_args(args, words):
    m = tiny_flux_models()
    with pytest.raises(UserError) as e:
        make(m, **args)
    assert words in _one_line(e)


@pytest.mark.parametrize("script", ["merge_lora", "sdxl_merge_lora"])
def test_lora_tools_refuse_flux_files(tmp_path, script, capsys):
    """The SD LoRA tools do not handle FLUX.1 files: one line naming the file, exit 2, nothing written."""
    import importlib
    m = tiny_flux_models()
    path = tmp_path / "flux.safetensors"
    save(m, path)
    out = tmp_path / "out.safetensors"
    argv = {"merge_lora": ["--models", str(path), "--ratios", "1", "--save_to", str(out)],
            "sdxl_merge_lora": ["--models", str(path), "--ratios", "1", "--save_to", str(out)]}[script]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"networks.{script}").main(argv)
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FLUX.1 LoRA" in err[0] and str(path) in err[0], err


def test_resize_lora_reads_flux_files(tmp_path):
    """resize_lora works per module on the file's own tensors, so a FLUX.1 file resizes (fused layers whole)."""
    from networks import resize_lora
    m = tiny_flux_models()
    path, out = tmp_path / "flux.safetensors", tmp_path / "small.safetensors"
    save(m, path)
    resize_lora.main(["--model", str(path), "--save_to", str(out), "--new_rank", "2"])
    assert lora_file_family(out) == "flux"
    network, sd = lora_flux.create_network_from_weights(1.0, str(out), m.ae, [m.clip_l, m.t5xxl], m.transformer)
    assert sd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (2, W)
