"""flux_train_network.py end to end on the tiny FLUX.1 models (issue 22 item 1).

Oracles: one step's loss written out by hand with diffusers' FluxTransformer2DModel and FluxPipeline's packing /
position-id helpers on the same draws; diffusers' FluxPipeline.load_lora_weights on the trained file; the resumed
run against the straight one; the docs' TOML example run as written.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import flux_train_network
from library.models.flux_loading import load_flux_models
from library.training.objective.diffusion_step import StepRandom
from library.training.runners.run_flux_network import FluxNetworkRecipe
from networks import lora_flux
from tests.networks.flux_helpers import assert_same_deltas, pipeline
from tests.training.train_helpers import make_shapes_folder

ROOT = Path(__file__).resolve().parents[2]
NO_LINEAR1 = r"network_reg_dims=single_blocks_\d+_linear1=0"  # diffusers splits linear1 by the released widths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("flux_data"), repeats=1, n=4, name="sks shape")


def model_args(paths, single_file=True) -> list[str]:
    if not single_file:
        return ["--pretrained_model_name_or_path", str(paths["diffusers"])]
    return ["--pretrained_model_name_or_path", str(paths["transformer"]), "--ae", str(paths["ae"]),
            "--clip_l", str(paths["clip_l"]), "--t5xxl", str(paths["t5xxl"]),
            "--tokenizer_cache_dir", str(paths["tokenizer_cache_dir"])]


def run_args(paths, data, out, steps=3, *extra, single_file=True) -> list[str]:
    return [*model_args(paths, single_file), "--train_data_dir", str(data), "--resolution", "64",
            "--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora_flux",
            "--network_dim", "4", "--network_alpha", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3",
            "--seed", "7", "--max_data_loader_n_workers", "0", "--console_log_simple", "--t5xxl_max_token_length",
            "16", *extra]


# ------------------------------------------------------------------ one step's loss, written out by hand

class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)


def _method(paths, argv):
    """The trainer's own method object (its recipe's loading, network and options), with a zero-init LoRA."""
    from library.config.config_file import parse_args_with_config
    from library.training.entry import setup_parser
    from library.training.settings.from_options import build_settings, resolve_options
    from networks.network_host import NetworkHost

    args = resolve_options(parse_args_with_config(setup_parser("flux_train_network"), argv), "flux_train_network",
                           False)
    settings = build_settings(args, "flux_train_network")
    recipe = FluxNetworkRecipe()
    models = recipe.load_models(args, _Acc, torch.float32)
    host = NetworkHost("networks.lora_flux")
    host.create(1.0, 4, 2, models.vae, models.text_encoders, models.unet, network_args={})
    host.apply_to(models.text_encoders, models.unet, True, True)
    run = type("Run", (), dict(args=args, settings=settings, acc=_Acc, wdtype=torch.float32, models=models))
    return recipe.make_method(run, host, True, True), recipe.flux


def _hand_loss(flux, images, captions, seed, *, sampling, ptype, t5_len, mask, guidance):
    """sd-scripts' FLUX step typed out: AE sample, noise, sigma, FluxPipeline's packing and ids, the transformer."""
    rand = StepRandom.for_step(seed, 0, 0, 0, "cpu")  # the same generator the trainer gets for this step
    g = rand.generator
    ae, tr = flux.ae, flux.transformer
    with torch.no_grad():
        z = ae.encode(images).latent_dist.sample(generator=g)
        lat = (z - ae.config.shift_factor) * ae.config.scaling_factor
        clip_tok, t5_tok = flux.tokenizers
        ids = clip_tok(captions, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        pooled = flux.clip_l(ids).pooler_output
        t5 = t5_tok(captions, max_length=t5_len, padding="max_length", truncation=True, return_tensors="pt")
        t5_mask = t5.attention_mask if mask else None
        t5_out = flux.t5xxl(t5.input_ids, attention_mask=t5_mask).last_hidden_state
        b, c, h, w = lat.shape
        noise = torch.randn(lat.shape, generator=g)
        if sampling == "uniform":
            sigma = torch.rand(b, generator=g)
        else:  # sigmoid
            sigma = torch.sigmoid(torch.randn(b, generator=g))
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * lat + s * noise
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
        kwargs = None
        if mask:  # keys: [text, image]; padding text tokens are not attended to
            keys = torch.cat([t5_mask.bool(), torch.ones(b, packed.shape[1], dtype=torch.bool)], dim=1)
            kwargs = {"attention_mask": keys[:, None, None, :]}
        out = tr(hidden_states=packed, timestep=sigma * 1000 / 1000, pooled_projections=pooled,
                 guidance=torch.full((b,), guidance) if tr.config.guidance_embeds else None,
                 encoder_hidden_states=t5_out, txt_ids=torch.zeros(t5_len, 3), img_ids=img_ids,
                 joint_attention_kwargs=kwargs, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
        weighting = 1.0
        if ptype == "sigma_scaled":
            pred = noisy - s * pred
            weighting = 2 / (torch.pi * (1 - 2 * s + 2 * s ** 2))  # cosmap
        target = noise - lat
        per_sample = (weighting * (pred - target) ** 2).mean(dim=(1, 2, 3))
        return per_sample.mean(), rand


@pytest.mark.parametrize("name,sampling,ptype,mask,fp8", [("dev", "uniform", "raw", False, False),
                                                          ("dev", "sigmoid", "sigma_scaled", True, False),
                                                          ("schnell", "uniform", "raw", True, False),
                                                          ("dev", "uniform", "raw", False, True)])
def test_one_step_loss_equals_hand_written_diffusers_loss(tiny_flux, tmp_path, name, sampling, ptype, mask, fp8):
    """fp8: --fp8_base_unet stores the transformer's Linear weights in fp8; the hand-written step calls that same
    transformer, so the trainer's plumbing (inputs in the compute dtype) is what is compared."""
    paths = tiny_flux[name]
    argv = ["--timestep_sampling", sampling, "--model_prediction_type", ptype, "--weighting_scheme", "cosmap",
            "--guidance_scale", "2.0", "--t5xxl_max_token_length", "16"] + (["--apply_t5_attn_mask"] if mask else [])
    argv += ["--fp8_base_unet"] if fp8 else []
    method, flux = _method(paths, model_args(paths) + ["--output_dir", str(tmp_path)] + argv)
    assert (flux.transformer.x_embedder.weight.dtype == torch.float8_e4m3fn) == fp8
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    captions = ["a red circle", "a blue square on a green background"]
    batch = {"images": images, "latents": None, "captions": captions, "loss_weights": torch.ones(2)}
    want, _ = _hand_loss(flux, images, captions, 7, sampling=sampling, ptype=ptype, t5_len=16, mask=mask,
                         guidance=2.0)
    got = method.loss(batch, StepRandom.for_step(7, 0, 0, 0, "cpu"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if mask:  # the mask matters: without it the T5 padding changes the loss
        method.apply_t5_attn_mask = False
        assert abs(float(method.loss(batch, StepRandom.for_step(7, 0, 0, 0, "cpu")).detach()) - float(want)) > 1e-6


# ------------------------------------------------------------------ runs

def _ups(path):
    return {k: v for k, v in load_file(str(path)).items() if k.endswith("lora_up.weight")}


def test_short_run_trains_and_diffusers_loads_the_file(tiny_flux, data, tmp_path):
    out = tmp_path / "out"
    flux_train_network.main(run_args(tiny_flux["dev"], data, out, 4, "--network_args", NO_LINEAR1,
                                     "--timestep_sampling", "flux_shift", "--model_prediction_type", "raw"))
    path = out / "lora.safetensors"
    ups = _ups(path)
    assert ups and any(v.abs().sum() > 0 for v in ups.values())  # lora_up starts at zero: training moved it
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["ss_timestep_sampling"] == "flux_shift" and meta["ss_model_prediction_type"] == "raw"
    assert meta["ss_guidance_scale"] == "3.5" and meta["ss_apply_t5_attn_mask"] == "False"
    assert meta["ss_steps"] == "4" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    # diffusers' FluxPipeline reads the file: every module becomes a PEFT layer with our delta, none left over
    ours = load_flux_models(str(tiny_flux["dev"]["diffusers"]))
    network, weights = lora_flux.create_network_from_weights(1.0, str(path), ours.ae, [ours.clip_l, ours.t5xxl],
                                                             ours.transformer)
    network.apply_to([ours.clip_l, ours.t5xxl], ours.transformer)
    assert not network.load_state_dict(weights, strict=False).unexpected_keys
    theirs = load_flux_models(str(tiny_flux["dev"]["diffusers"]))
    pipeline(theirs).load_lora_weights(str(path))
    assert_same_deltas(network, ((ours.transformer, theirs.transformer), (ours.clip_l, theirs.clip_l)))
    assert len(network.unet_loras) == 2 * 10 + 2 * 2 and len(network.text_encoder_loras) == 18


def test_schnell_diffusers_folder_and_options(tiny_flux, data, tmp_path):
    out = tmp_path / "out"
    flux_train_network.main(run_args(tiny_flux["schnell"], data, out, 2, "--timestep_sampling", "sigma",
                                     "--weighting_scheme", "logit_normal", "--apply_t5_attn_mask", "--cache_latents",
                                     "--network_train_unet_only", "--loss_type", "huber", "--huber_schedule",
                                     "exponential", single_file=False))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora" and meta["ss_weighting_scheme"] == "logit_normal"
    assert keys and not any(k.startswith("lora_te") for k in keys)


def test_resume_continues_bit_identically(tiny_flux, data, tmp_path):
    """4 straight steps == 2 steps + save_state + resume + 2 steps, tensor for tensor."""
    common = ["--save_every_n_steps", "2", "--save_state", "--network_dropout", "0.1", "--timestep_sampling",
              "sigmoid", "--ip_noise_gamma", "0.1"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    flux_train_network.main(run_args(tiny_flux["dev"], data, straight, 4, *common))
    state = straight / "lora-step00000002-state"
    assert (state / "train_state.json").exists()
    flux_train_network.main(run_args(tiny_flux["dev"], data, resumed, 4, *common, "--resume", str(state)))
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _docs_toml_blocks() -> list[str]:
    text = (ROOT / "docs" / "flux.md").read_text(encoding="utf-8")
    section = text.split("## Training (`flux_train_network.py`)", 1)[1]
    return re.findall(r"```toml\n(.*?)```", section, flags=re.S)


def test_docs_config_example_runs_as_written(tiny_flux, data, tmp_path):
    config, dataset = _docs_toml_blocks()
    p = tiny_flux["dev"]
    for old, new in (("/models/flux1-dev.safetensors", p["transformer"]), ("/models/ae.safetensors", p["ae"]),
                     ("/models/clip_l.safetensors", p["clip_l"]), ("/models/t5xxl_fp16.safetensors", p["t5xxl"]),
                     ("/work/dataset.toml", tmp_path / "dataset.toml"), ("/work/output", tmp_path / "output")):
        assert f'"{old}"' in config
        config = config.replace(f'"{old}"', f'"{new}"')
    config += f'tokenizer_cache_dir = "{p["tokenizer_cache_dir"]}"\n'  # offline: the tiny T5 tokenizer's folder
    assert '"/work/images"' in dataset
    (tmp_path / "dataset.toml").write_text(dataset.replace('"/work/images"', f'"{data / "1_sks shape"}"'))
    (tmp_path / "flux_lora.toml").write_text(config)
    flux_train_network.main(["--config_file", str(tmp_path / "flux_lora.toml")])
    out = tmp_path / "output"
    assert (out / "my-flux-lora.safetensors").exists() and (out / "my-flux-lora-000002.safetensors").exists()
    with safe_open(str(out / "my-flux-lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_epoch"] == "4" and meta["ss_steps"] == "16" and meta["ss_discrete_flow_shift"] == "3.1582"


def test_dry_run_loads_nothing(tiny_flux, data, tmp_path, capsys):
    flux_train_network.main(run_args(tiny_flux["dev"], data, tmp_path / "out", 5, "--dry_run"))
    text = capsys.readouterr().out
    assert "dry run of flux_train_network.py" in text
    # the FLUX.1 memory estimate (tests/training/test_flux_memory_estimate.py checks its numbers): the tiny model's
    # parts read from their headers, 64 px -> 4 x 4 image tokens, the 16 T5 tokens of the options
    assert "peak accelerator memory estimate (flux; rough model, see docs/flux.md)" in text
    assert "16 image + 16 text tokens, width 64" in text and "estimated peak" in text
    assert "FLUX.1-dev size" not in text
    assert not (tmp_path / "out" / "lora.safetensors").exists()


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing loaded

def _fails(argv, tmp_path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "flux_train_network.py"), *argv], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    # log lines (dataset scan) may come first; the error itself is one line
    lines = [ln for ln in proc.stderr.strip().splitlines()
             if ln.strip() and not re.match(r"[\d:]+ (INFO|WARNING) ", ln)]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "loading FLUX.1" not in proc.stderr
    return lines[0]


def test_bad_inputs_are_one_line(tiny_flux, tiny_sd, data, tmp_path):
    p = tiny_flux["dev"]
    base = run_args(p, data, tmp_path / "out", 2)
    no_ae = [a for i, a in enumerate(base) if a != "--ae" and (i == 0 or base[i - 1] != "--ae")]
    assert "give --ae" in _fails(no_ae + ["--console_log_level", "ERROR"], tmp_path)
    sd = run_args(p, data, tmp_path / "out", 2)
    sd[1] = str(tiny_sd["sd1"]["safetensors"])
    assert "an SD1 model; flux_train_network.py trains FLUX.1" in _fails(sd, tmp_path)
    wrong_ae = [str(tiny_sd["sd1"]["safetensors"]) if a == str(p["ae"]) else a for a in base]
    assert "--ae" in _fails(wrong_ae, tmp_path)
    for extra, words in ((["--fp8_base"], "--fp8_base needs --mixed_precision"),
                         (["--blocks_to_swap", "1"], "--blocks_to_swap 1: this model has 2 double and 2 single"),
                         (["--split_mode"], "--blocks_to_swap 18: this model has 2 double"),  # upstream's alias
                         (["--fp8_base_unet"], "--fp8_base_unet needs --mixed_precision"),
                         (["--model_type", "chroma"], "--model_type chroma"),
                         (["--network_module", "networks.lora"], "networks.lora_flux only"),
                         (["--min_snr_gamma", "5"], "--min_snr_gamma needs an SNR"),
                         (["--loss_type", "huber"], "--huber_schedule snr is not supported for FLUX.1"),
                         (["--timestep_sampling", "logit"], "invalid choice")):
        line = _fails(base + extra, tmp_path)
        assert words in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_sd_trainer_names_flux_trainer(tiny_flux, data, tmp_path):
    for model in (tiny_flux["dev"]["transformer"], tiny_flux["dev"]["diffusers"]):  # the folder looks SDXL-like
        argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir",
                str(tmp_path / "o"), "--network_module", "networks.lora"]
        proc = subprocess.run([sys.executable, str(ROOT / "train_network.py"), *argv], capture_output=True,
                              text=True, cwd=tmp_path, timeout=300)
        assert proc.returncode == 2 and "is a FLUX.1 model; train_network.py trains Stable Diffusion: use " \
            "flux_train_network.py" in proc.stderr, proc.stderr


def test_network_weights_continue_and_wrong_family(tiny_flux, tiny_sd, data, tmp_path):
    """--network_weights: a FLUX LoRA continues (dim_from_weights), an SD LoRA is refused before loading."""
    first = tmp_path / "first"
    flux_train_network.main(run_args(tiny_flux["dev"], data, first, 2))
    second = tmp_path / "second"
    flux_train_network.main(run_args(tiny_flux["dev"], data, second, 2, "--network_weights",
                                     str(first / "lora.safetensors"), "--dim_from_weights", "--learning_rate", "0"))
    a, b = load_file(str(first / "lora.safetensors")), load_file(str(second / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # learning rate 0: loaded as is
    import train_network

    sd_lora = tmp_path / "sd"
    train_network.main(["--pretrained_model_name_or_path", str(tiny_sd["sd1"]["safetensors"]), "--train_data_dir",
                        str(data), "--resolution", "64", "--output_dir", str(sd_lora), "--output_name", "lora",
                        "--network_module", "networks.lora", "--max_train_steps", "1", "--seed", "1",
                        "--max_data_loader_n_workers", "0"])
    line = _fails(run_args(tiny_flux["dev"], data, tmp_path / "x", 2, "--network_weights",
                           str(sd_lora / "lora.safetensors")), tmp_path)
    assert "--network_weights" in line and "SD1" in line, line


def test_sample_images_leave_training_unchanged(tiny_flux, data, tmp_path):
    """--sample_prompts: images at the scheduled steps, sizes floored to 16; the trained weights equal a run
    without samples (sampling restores the RNG states)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 80 --d 5 --s 2\n# comment\na blue square --w 72 --h 64 --s 1\n")
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    flux_train_network.main(run_args(tiny_flux["dev"], data, plain, 4))
    flux_train_network.main(run_args(tiny_flux["dev"], data, sampled, 4, "--sample_prompts", str(prompts),
                                     "--sample_every_n_steps", "2", "--sample_at_first"))
    a, b = load_file(str(plain / "lora.safetensors")), load_file(str(sampled / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from PIL import Image

    names = sorted(p.name for p in (sampled / "sample").iterdir())
    # before training (sd-scripts names it e000000), steps 2 and 4; x 2 prompts; the seed ends the first's name
    assert [re.sub(r"_\d{14}", "", n) for n in names] == ["lora_000002_00_5.png", "lora_000002_01.png",
                                                           "lora_000004_00_5.png", "lora_000004_01.png",
                                                           "lora_e000000_00_5.png", "lora_e000000_01.png"]
    sizes = {Image.open(sampled / "sample" / n).size for n in names}
    assert sizes == {(64, 80), (64, 64)}  # floored to multiples of 16, as upstream


def test_wrapper_class_bf16_and_t5_lora(tiny_flux, data, tmp_path):
    """sd-scripts' ``FluxNetworkTrainer().train(args)``; bf16 with the LoRA in bf16, gradient checkpointing, and a
    T5-XXL LoRA (``train_t5xxl``) next to CLIP-L's."""
    out = tmp_path / "out"
    args = flux_train_network.setup_parser().parse_args(run_args(
        tiny_flux["dev"], data, out, 2, "--mixed_precision", "bf16", "--full_bf16", "--gradient_checkpointing",
        "--save_precision", "bf16", "--network_args", "train_t5xxl=True"))
    flux_train_network.FluxNetworkTrainer().train(args)
    weights = load_file(str(out / "lora.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert any(k.startswith("lora_te3_") for k in weights) and any(k.startswith("lora_te1_") for k in weights)


def test_text_encoder_output_cache_trains_as_without(tiny_flux, data, tmp_path):
    """--cache_text_encoder_outputs (frozen encoders): the same LoRA, tensor for tensor, as encoding every step."""
    common = ["--network_train_unet_only", "--apply_t5_attn_mask", "--timestep_sampling", "sigmoid"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    flux_train_network.main(run_args(tiny_flux["dev"], data, plain, 3, *common))
    flux_train_network.main(run_args(tiny_flux["dev"], data, cached, 3, *common, "--cache_text_encoder_outputs"))
    a, b = load_file(str(plain / "lora.safetensors")), load_file(str(cached / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # on disk: <image>_flux_te_outputs.npz (never SDXL's _te_outputs.npz); written, then read back, equal again
    folder = data / "1_sks shape"
    for run in ("disk1", "disk2"):
        flux_train_network.main(run_args(tiny_flux["dev"], data, tmp_path / run, 3, *common,
                                         "--cache_text_encoder_outputs_to_disk"))
        c = load_file(str(tmp_path / run / "lora.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a)
    files = sorted(folder.glob("*_flux_te_outputs.npz"))
    assert len(files) == 4 and not list(folder.glob("*[0-9]_te_outputs.npz"))
    assert np.load(files[0])["hidden_state1"].shape == (16, 32)
    # another T5 length: the files are encoded again
    flux_train_network.main(run_args(tiny_flux["dev"], data, tmp_path / "disk3", 1, *common,
                                     "--cache_text_encoder_outputs_to_disk", "--t5xxl_max_token_length", "8"))
    assert np.load(files[0])["hidden_state1"].shape == (8, 32)
    for f in files:
        f.unlink()
    line = _fails(run_args(tiny_flux["dev"], data, tmp_path / "x", 2, "--cache_text_encoder_outputs",
                           "--network_args", "train_t5xxl=True"), tmp_path)
    assert "cannot be used when T5-XXL trains" in line
    line = _fails(run_args(tiny_flux["dev"], data, tmp_path / "x", 2, "--cache_text_encoder_outputs",
                           "--network_train_unet_only", "--shuffle_caption"), tmp_path)
    assert "shuffle_caption" in line, line


def test_fp8_base_trains_in_bf16(tiny_flux, data, tmp_path):
    out = tmp_path / "out"
    flux_train_network.main(run_args(tiny_flux["dev"], data, out, 2, "--fp8_base", "--mixed_precision", "bf16",
                                     "--gradient_checkpointing"))
    assert any(v.abs().sum() > 0 for v in _ups(out / "lora.safetensors").values())


def test_base_weights_are_merged_by_hand_formula(tiny_flux, data, tmp_path):
    """--base_weights: W + multiplier * alpha / rank * up @ down, for a plain layer (single block linear2) and a
    CLIP-L layer, from the file's own tensors."""
    first = tmp_path / "first"
    flux_train_network.main(run_args(tiny_flux["dev"], data, first, 2, "--learning_rate", "1e-2"))
    lora = load_file(str(first / "lora.safetensors"))
    p = tiny_flux["dev"]
    plain, _ = _method(p, model_args(p) + ["--output_dir", str(tmp_path)])
    merged, flux = _method(p, model_args(p) + ["--output_dir", str(tmp_path), "--base_weights",
                                               str(first / "lora.safetensors"), "--base_weights_multiplier", "0.7"])
    for name, layer in (("lora_unet_single_blocks_0_linear2", lambda m: m.unet.single_transformer_blocks[0].proj_out),
                        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                         lambda m: next(x for n, x in m.text_encoders[0].named_modules()
                                        if n.endswith("layers.0.self_attn.q_proj")))):
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        scale = float(lora[f"{name}.alpha"]) / down.shape[0]
        want = layer(plain.models).weight + 0.7 * scale * (up @ down)
        assert up.abs().sum() > 0
        torch.testing.assert_close(layer(merged.models).weight, want, rtol=1e-5, atol=1e-6)


def test_latent_cache_on_disk_has_its_own_files(tiny_flux, data, tmp_path):
    """--cache_latents_to_disk: <image>_flux_latents.npz (16 channels), never SD's <image>.npz; the LoRA equals
    the in-memory cache's, written and then read back."""
    folder = data / "1_sks shape"
    memory = tmp_path / "memory"
    flux_train_network.main(run_args(tiny_flux["dev"], data, memory, 3, "--cache_latents"))
    a = load_file(str(memory / "lora.safetensors"))
    for run in ("disk1", "disk2"):
        flux_train_network.main(run_args(tiny_flux["dev"], data, tmp_path / run, 3, "--cache_latents_to_disk"))
        b = load_file(str(tmp_path / run / "lora.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    files = sorted(folder.glob("*_flux_latents.npz"))
    assert len(files) == 4 and not list(folder.glob("[0-9].npz"))
    assert np.load(files[0])["latents"].shape == (16, 8, 8)
    for f in files:
        f.unlink()


def test_prepared_sd_latents_are_refused(tmp_path):
    from types import SimpleNamespace

    from library.errors import UserError
    from library.training.runners.run_flux_network import check_prepared_latents

    path = tmp_path / "img.npz"
    np.savez(path, latents=np.zeros((4, 8, 8), np.float32))
    group = SimpleNamespace(datasets=[SimpleNamespace(images=[SimpleNamespace(latents_npz=str(path))])])
    with pytest.raises(UserError, match="latents of 4 channels, FLUX.1's AE makes 16"):
        check_prepared_latents(group)
    np.savez(path, latents=np.zeros((16, 8, 8), np.float32))
    check_prepared_latents(group)


def test_cached_t5_with_trained_clip_l_trains_as_without(tiny_flux, data, tmp_path):
    """--cache_text_encoder_outputs while CLIP-L trains (upstream's documented command): T5-XXL's outputs from the
    cache, CLIP-L run every step with its LoRA; the same LoRA, tensor for tensor, as encoding both every step."""
    common = ["--apply_t5_attn_mask", "--timestep_sampling", "sigmoid"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    flux_train_network.main(run_args(tiny_flux["dev"], data, plain, 3, *common))
    flux_train_network.main(run_args(tiny_flux["dev"], data, cached, 3, *common, "--cache_text_encoder_outputs"))
    a, b = load_file(str(plain / "lora.safetensors")), load_file(str(cached / "lora.safetensors"))
    assert any(k.startswith("lora_te1_") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_loss_is_deterministic_and_leaves_training_unchanged(tiny_flux, tmp_path):
    """validation_split: fixed noise and sigma = t / 1000 at the validator's 5 bands; the training losses and
    weights equal a run without validation, and a pass gives the same number for the same weights."""
    from tests.training.test_validation_loss import _scalars

    data = make_shapes_folder(tmp_path / "data", repeats=1, n=5)
    runs = {}
    for name, extra in (("plain", ["--validate_every_n_epochs", "1000"]), ("val", ["--validate_every_n_steps", "1"]),
                        ("val2", ["--validate_every_n_steps", "2"])):
        out = tmp_path / name
        flux_train_network.main(run_args(tiny_flux["dev"], data, out, 4, "--validation_split", "0.4", *extra,
                                         "--logging_dir", str(tmp_path / f"log_{name}")))
        runs[name] = (load_file(str(out / "lora.safetensors")), _scalars(tmp_path / f"log_{name}"))
    plain, val, val2 = runs["plain"], runs["val"], runs["val2"]
    assert plain[1]["loss/current"] == val[1]["loss/current"]
    assert all(torch.equal(t, val[0][k]) for k, t in plain[0].items())
    assert [s for s, _ in val[1]["loss/validation"]] == [1, 2, 3, 4]
    assert dict(val2[1]["loss/validation"]) == {s: v for s, v in val[1]["loss/validation"] if s % 2 == 0}
    bands = sorted(t for t in val[1] if t.startswith("loss/validation_t"))
    assert len(bands) == 5 and len({dict(val[1][t])[4] for t in bands}) == 5  # the loss depends on sigma
