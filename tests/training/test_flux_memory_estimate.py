"""The FLUX.1 peak-memory estimate of ``--dry_run`` (library/training/runners/flux_memory_estimate.py).

Oracles: the byte counts of the tiny FLUX.1 models as actually loaded (bf16, and with the transformer's Linear
weights in fp8), diffusers' FluxTransformer2DModel built on the meta device from the released FLUX.1-dev config
(written out here), the tensors autograd really keeps for backward (``saved_tensors_hooks``) per block of a
tiny FLUX.1 with a LoRA applied, and hand-computed LoRA sizes.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

import flux_train_network
from library.models.flux_loading import load_flux_models
from library.models.flux_tiny import tiny_flux_config
from library.training.memory.fp8_storage import store_in_fp8
from library.training.runners import flux_memory_estimate as fme
from networks.lora_flux import create_network
from tests.training.train_helpers import make_shapes_folder
from tools.make_tiny_model import write_tiny_flux

# black-forest-labs/FLUX.1-dev transformer/config.json
RELEASED_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=(16, 56, 56))


def _args(paths=None, **kw) -> argparse.Namespace:
    base = dict(pretrained_model_name_or_path="/nonexistent/flux1-dev.safetensors", ae=None, clip_l=None, t5xxl=None,
                mixed_precision="bf16", fp8_base=False, fp8_base_unet=False, no_half_vae=False, network_dim=4,
                network_args=None, network_train_unet_only=False, cache_latents=False,
                cache_text_encoder_outputs=False, gradient_checkpointing=True, optimizer_type="AdamW",
                blocks_to_swap=None, t5xxl_max_token_length=None, full_bf16=False, full_fp16=False)
    if paths is not None:
        base.update(pretrained_model_name_or_path=str(paths["transformer"]), ae=str(paths["ae"]),
                    clip_l=str(paths["clip_l"]), t5xxl=str(paths["t5xxl"]))
    base.update(kw)
    return argparse.Namespace(**base)


def _row(rows, start: str) -> int:
    found = [b for label, b in rows if label.startswith(start)]
    assert len(found) == 1, rows
    return found[0]


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())  # tied tensors once


@pytest.fixture(scope="module")
def loaded(tiny_flux):
    p = tiny_flux["dev"]
    return load_flux_models(str(p["transformer"]), ae=str(p["ae"]), clip_l=str(p["clip_l"]), t5xxl=str(p["t5xxl"]),
                            tokenizer_cache_dir=str(p["tokenizer_cache_dir"]))


def _released_meta() -> FluxTransformer2DModel:
    with torch.device("meta"):
        return FluxTransformer2DModel(**RELEASED_DEV)


# ------------------------------------------------------------------ (1) weights = the loaded models' bytes

@pytest.mark.parametrize("fp8", [False, True])
def test_weight_rows_equal_the_loaded_tiny_models(tiny_flux, loaded, fp8):
    rows = fme.estimate_flux(_args(tiny_flux["dev"], fp8_base=fp8), 16, 1)
    for _, m in loaded.parts():
        m.to(torch.bfloat16)
    expected = {"clip_l": _bytes(loaded.clip_l), "t5xxl": _bytes(loaded.t5xxl), "ae": _bytes(loaded.ae)}
    transformer = loaded.transformer
    if fp8:
        store_in_fp8(transformer, torch.bfloat16)
    expected["transformer"] = _bytes(transformer)
    for part, size in expected.items():
        assert _row(rows, f"weights {part} ") == size, part
    # --no_half_vae: the AE in float32; parked parts count 0
    rows = fme.estimate_flux(_args(tiny_flux["dev"], no_half_vae=True, cache_latents=True), 16, 1)
    assert _row(rows, "weights ae ") == 0
    rows = fme.estimate_flux(_args(tiny_flux["dev"], no_half_vae=True, cache_text_encoder_outputs=True), 16, 1)
    assert _row(rows, "weights ae ") == expected["ae"] * 2 and _row(rows, "weights t5xxl ") == 0
    assert _row(rows, "weights clip_l ") == expected["clip_l"]  # CLIP-L trains: it stays
    rows = fme.estimate_flux(_args(tiny_flux["dev"], cache_text_encoder_outputs=True, network_train_unet_only=True),
                             16, 1)
    assert _row(rows, "weights clip_l ") == 0


def test_sharded_diffusers_folder_reads_every_shard(tiny_flux, tmp_path):
    """A Diffusers folder whose transformer is split in two shards + index: the same rows as the BFL files."""
    src = tiny_flux["dev"]["diffusers"]
    folder = tmp_path / "sharded"
    for sub in ("text_encoder", "text_encoder_2", "vae"):
        (folder / sub).mkdir(parents=True)
        for f in (src / sub).iterdir():
            (folder / sub / f.name).write_bytes(f.read_bytes())
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_bytes((src / "transformer" / "config.json").read_bytes())
    sd = load_file(str(src / "transformer" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, halves):
        save_file({k: sd[k] for k in part}, str(folder / "transformer" / name))
    index = {"weight_map": {k: names[i] for i, part in enumerate(halves) for k in part}}
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    from_files = fme.estimate_flux(_args(tiny_flux["dev"]), 16, 1)
    from_folder = fme.estimate_flux(_args(pretrained_model_name_or_path=str(folder)), 16, 1)
    shapes = fme.read_flux_shapes(_args(pretrained_model_name_or_path=str(folder)))
    assert all(shapes.from_header.values())
    assert [b for _, b in from_folder] == [b for _, b in from_files]


# ------------------------------------------------------------------ (2) block swapping

@pytest.mark.parametrize("fp8", [False, True])
def test_blocks_to_swap_drops_the_swapped_blocks_less_one_in_transfer(fp8):
    model = _released_meta()

    def block(b):  # bytes of one block as our run keeps it
        return sum(p.numel() * (1 if fp8 and p.dim() == 2 else 2) for p in b.parameters())

    double, single = block(model.transformer_blocks[0]), block(model.single_transformer_blocks[0])
    base = _row(fme.estimate_flux(_args(fp8_base=fp8), 4096, 1), "weights transformer")
    for k, (nd, ns) in ((16, (8, 16)), (1, (0, 2)), (28, (14, 28)), (35, (17, 36))):
        rows = fme.estimate_flux(_args(fp8_base=fp8, blocks_to_swap=k), 4096, 1)
        headroom = (double if nd else 0) + (single if ns else 0)
        assert base - _row(rows, "weights transformer") == nd * double + ns * single - headroom, k


# ------------------------------------------------------------------ (3) activations: what autograd keeps

def _saved_per_block(fp8: bool, batch: int = 2, n_img: int = 512, n_txt: int = 64):
    """Bytes autograd keeps for backward per block of a tiny FLUX.1 with a LoRA, each storage counted once, in
    the first block that saved it (the rotary table, shared by all blocks, lands in the first one)."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**tiny_flux_config("dev")).to(torch.bfloat16).requires_grad_(False)
    net = create_network(1.0, 4, 1.0, None, [None, None], model)
    net.apply_to([None, None], model, apply_text_encoder=False, apply_unet=True)
    net.to(torch.bfloat16)
    if fp8:
        store_in_fp8(model, torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(net.parameters())}
    current, seen, saved = [None], set(), {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if current[0] is not None and ptr not in params and ptr not in seen:
            seen.add(ptr)
            saved[current[0]] = saved.get(current[0], 0) + t.untyped_storage().nbytes()
        return t

    for kind, blocks in (("double", model.transformer_blocks), ("single", model.single_transformer_blocks)):
        for i, b in enumerate(blocks):
            b.register_forward_pre_hook(lambda m, a, key=(kind, i): current.__setitem__(0, key))
            b.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))
    cfg = model.config
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(hidden_states=torch.randn(batch, n_img, cfg.in_channels, dtype=torch.bfloat16),
              encoder_hidden_states=torch.randn(batch, n_txt, cfg.joint_attention_dim, dtype=torch.bfloat16),
              pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, dtype=torch.bfloat16),
              timestep=torch.tensor([0.5] * batch), img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3),
              guidance=torch.tensor([1.0] * batch), return_dict=False)
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return saved, batch * (n_img + n_txt), width, model


def test_activation_counts_match_what_autograd_keeps():
    saved, tokens, width, model = _saved_per_block(fp8=False)
    # block 1 of each kind: its input needs a gradient (block 0's embedder outputs need none)
    for kind, (n16, n32) in (("double", fme.DOUBLE_ACT), ("single", fme.SINGLE_ACT)):
        measured = saved[(kind, 1)] / (tokens * width)
        analytic = n16 * 2 + n32 * 4
        assert abs(measured - analytic) <= 0.1 * analytic, (kind, measured, analytic)
    # activation_bytes without checkpointing is the per-block counts summed (batch 1 per sample)
    nd, ns = model.config.num_layers, model.config.num_single_layers
    assert fme.activation_bytes(10, width, nd, ns, 2, False) == 10 * width * (nd * 48 + ns * 40)
    assert fme.activation_bytes(10, width, nd, ns, 2, True) == 10 * width * (2 * (nd + ns) + 48)


def test_fp8_keeps_the_upcast_weights_of_linears_whose_input_needs_a_gradient():
    plain, *_ = _saved_per_block(fp8=False)
    fp8, _, _, model = _saved_per_block(fp8=True)
    shapes = fme._bfl_from_diffusers({k: tuple(v.shape) for k, v in model.state_dict().items()})
    per_double = fme._upcast_weights({k: s for k, s in shapes.items() if k.startswith("double_blocks.1.")}, 2, True)
    per_single = fme._upcast_weights({k: s for k, s in shapes.items() if k.startswith("single_blocks.1.")}, 2, True)
    assert fp8[("double", 1)] - plain[("double", 1)] == per_double
    assert fp8[("single", 1)] - plain[("single", 1)] == per_single
    # every block keeps them (even the first: its Linears read the LoRA-modulated input, which needs a gradient)
    assert fme._upcast_weights(shapes, 2, False) == sum(fp8[k] - plain[k] for k in plain)


# ------------------------------------------------------------------ (5) the released sizes when nothing is readable

def test_released_flux_dev_sizes_when_no_header_is_readable():
    model = _released_meta()
    n = sum(p.numel() for p in model.parameters())
    assert 11.8e9 < n < 12.0e9
    shapes = fme.read_flux_shapes(_args())
    assert not any(shapes.from_header.values())
    rows = fme.estimate_flux(_args(), 4096, 1)
    assert _row(rows, "weights transformer") == 2 * n
    assert _row(rows, "weights t5xxl") == 2 * 4762310656  # T5EncoderModel of t5-v1_1-xxl, shared embedding once
    # LoRA rank 4 over every block Linear, BFL's fused layers one module: hand-computed from the widths
    d = 3072
    double = (6 * d + d) + (3 * d + d) + (d + d) + (4 * d + d) + (d + 4 * d)  # mod, qkv, proj, mlp.0, mlp.2
    single = (7 * d + d) + (d + 5 * d) + (3 * d + d)  # linear1, linear2, modulation
    clip = 12 * (4 * (768 + 768) + (768 + 3072) + (3072 + 768))
    assert _row(rows, "weights network") == 4 * 4 * (19 * 2 * double + 38 * single + clip)
    rows16 = fme.estimate_flux(_args(network_train_unet_only=True, network_dim=16), 4096, 1)
    assert _row(rows16, "weights network") == 4 * 16 * (19 * 2 * double + 38 * single)


# ------------------------------------------------------------------ the LoRA row = the network networks.lora_flux builds

@pytest.mark.parametrize("network_args,unet_only", [
    (None, False), (None, True), (["train_blocks=single"], False), (["train_t5xxl=True"], False),
    (["train_double_block_indices=1", "img_attn_dim=8", "single_mod_dim=0"], True),
    (["in_dims=2,0,3,0,5", r"network_reg_dims=single_blocks_\d+_linear2=6,double_blocks_0_txt=2"], False)])
def test_network_row_equals_the_networks_parameters(tiny_flux, loaded, network_args, unet_only):
    rows = fme.estimate_flux(_args(tiny_flux["dev"], network_args=network_args, network_train_unet_only=unet_only,
                                   network_dim=4), 16, 1)
    kwargs = dict(a.split("=", 1) for a in network_args or [])
    net = create_network(1.0, 4, 1.0, loaded.ae, [loaded.clip_l, loaded.t5xxl], loaded.transformer, **kwargs)
    modules = net.unet_loras + ([] if unet_only else net.text_encoder_loras)
    n = sum(p.numel() for m in modules for p in m.parameters())
    assert _row(rows, "weights network") == 4 * n  # float32


# ------------------------------------------------------------------ (4) through flux_train_network.py --dry_run

def test_dry_run_prints_the_estimate_with_blocks_to_swap(tmp_path, capsys):
    """A tiny FLUX.1 of 4 double and 6 single blocks: --blocks_to_swap 3 parks 1 double and 4 single blocks (the
    option checks pass; the rows say so)."""
    p = write_tiny_flux("dev", tmp_path / "m", formats=("safetensors",), blocks=(4, 6))
    data = make_shapes_folder(tmp_path / "data", repeats=1, n=2, name="sks shape")
    argv = ["--pretrained_model_name_or_path", str(p["transformer"]), "--ae", str(p["ae"]), "--clip_l",
            str(p["clip_l"]), "--t5xxl", str(p["t5xxl"]), "--tokenizer_cache_dir", str(p["tokenizer_cache_dir"]),
            "--train_data_dir", str(data), "--resolution", "64", "--output_dir", str(tmp_path / "out"),
            "--network_module", "networks.lora_flux", "--max_train_steps", "2", "--mixed_precision", "bf16",
            "--cache_latents", "--gradient_checkpointing", "--t5xxl_max_token_length", "16", "--dry_run"]
    flux_train_network.main(argv)
    plain = capsys.readouterr().out
    flux_train_network.main(argv + ["--blocks_to_swap", "3"])
    swapped = capsys.readouterr().out
    assert "--blocks_to_swap 3: 1 double + 4 single in CPU memory, 1 of each in transfer" in swapped
    assert "--blocks_to_swap" not in plain and "estimated peak" in plain
    assert "weights ae (1.0M; in CPU memory while training)" in swapped  # --cache_latents
    assert "(while caching, ae are on the device as well" in swapped
    # the bytes (too few for the printed GiB) are checked in test_blocks_to_swap_drops_the_swapped_blocks_...
