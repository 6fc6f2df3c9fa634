"""FLUX.1 LoRA in gen_img.py (networks.lora_flux) against diffusers' FluxPipeline.load_lora_weights.

The LoRA files are made on the tiny dev model with random non-zero factors: transformer, CLIP-L (lora_te1_) and
T5-XXL (lora_te3_) modules. diffusers' kohya-FLUX converter splits ``single_blocks.N.linear1`` by the released
widths, so the files leave linear1 out (upstream's ``network_reg_dims`` rank 0), as in test_lora_flux_oracle.py;
diffusers drops T5 LoRA modules, so the oracle adds them into its T5 by hand: ``W += m · alpha / rank · up @ down``
for the Linear named ``lora_te3_`` + its path with ``.`` -> ``_`` (sd-scripts' naming rule).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import gen_img
from library.formats.flux_metadata import flux_lora_metadata
from library.models.flux_loading import load_flux_models
from library.sampling import gen_setup
from library.sampling.flux_pipeline import FluxGenerator
from library.sampling.flux_sampling import pack_latents
from networks import lora_flux
from tests.networks.flux_helpers import randomize

PROMPT = "a red circle on a white background"
SIZE, STEPS, GUIDANCE, SEED = 32, 2, 4.0, 5
ARGS = dict(network_reg_dims=r"single_blocks_\d+_linear1=0", train_t5xxl="True")


@pytest.fixture(scope="module")
def loras(tiny_flux, tmp_path_factory):
    """Two LoRA files of the tiny dev model (different random factors, ranks and alphas)."""
    folder = str(tiny_flux["dev"]["diffusers"])
    root = tmp_path_factory.mktemp("flux_loras")
    files = []
    for i, (dim, alpha) in enumerate(((4, 2.0), (2, 2.0))):
        m = load_flux_models(folder)
        network = lora_flux.create_network(1.0, dim, alpha, m.ae, [m.clip_l, m.t5xxl], m.transformer, **ARGS)
        randomize(network, seed=i, std=0.2)
        path = root / f"lora{i}.safetensors"
        network.save_weights(str(path), None, flux_lora_metadata("dev", dim, alpha, ARGS, {}))
        files.append(str(path))
    sd = load_file(files[0])
    assert any(k.startswith("lora_te1_") for k in sd) and any(k.startswith("lora_te3_") for k in sd)
    assert any(k.startswith("lora_unet_double_blocks_") for k in sd)
    assert any(k.startswith("lora_unet_single_blocks_") for k in sd)
    return files


@torch.no_grad()
def _add_t5_lora(t5, path: str, multiplier: float) -> int:
    """The oracle's T5 part: every ``lora_te3_`` module added into the T5 Linear it names."""
    sd = load_file(path)
    added = 0
    for name, module in t5.named_modules():
        key = "lora_te3_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear) and f"{key}.lora_down.weight" in sd:
            down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
            module.weight += multiplier * float(sd[f"{key}.alpha"]) / down.shape[0] * (up @ down)
            added += 1
    return added


def _oracle(folder: str, loras: list[tuple[str, float]], guidance: float | None = GUIDANCE) -> torch.Tensor:
    """FluxPipeline's packed final latents for PROMPT with ``loras`` ((file, multiplier), ...) loaded.

    One LoRA: its scale given as ``joint_attention_kwargs={"scale": m}`` (transformer and CLIP-L); several:
    ``set_adapters`` with the multipliers as adapter weights."""
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    names = [f"net{i}" for i in range(len(loras))]
    for name, (path, mul) in zip(names, loras):
        pipe.load_lora_weights(path, adapter_name=name)
        _add_t5_lora(pipe.text_encoder_2, path, mul)
    kwargs = {}
    if len(loras) == 1:
        kwargs["joint_attention_kwargs"] = {"scale": loras[0][1]}
    elif loras:
        pipe.set_adapters(names, adapter_weights=[mul for _, mul in loras])
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    return pipe(prompt=PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
                **kwargs).images


def _gen_latents(monkeypatch, tmp_path, argv: list[str], prompt: str | None = None) -> list[torch.Tensor]:
    """gen_img.main's final latents (packed, one per batch) for ``argv`` on PROMPT (or the --from_file lines)."""
    seen = []
    decode = FluxGenerator.decode

    def recording(self, latents):
        seen.append(pack_latents(latents.clone()))
        return decode(self, latents)

    monkeypatch.setattr(FluxGenerator, "decode", recording)
    common = ["--W", str(SIZE), "--H", str(SIZE), "--steps", str(STEPS), "--seed", str(SEED), "--outdir",
              str(tmp_path / "out")]
    if "schnell" not in argv[1]:
        common += ["--guidance_scale", str(GUIDANCE)]
    source = ["--prompt", PROMPT] if prompt is None else []
    gen_img.main([*argv, *source, *common])
    return seen


def _flux(tiny_flux, *networks: str) -> list[str]:
    argv = ["--ckpt", str(tiny_flux["dev"]["diffusers"])]
    if networks:
        argv += ["--network_module", *["networks.lora_flux"] * len(networks), "--network_weights", *networks]
    return argv


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode, mul", [("hook", 1.0), ("hook", 0.6), ("merge", 0.6), ("pre_calc", 0.6)])
def test_lora_equals_flux_pipeline(tiny_flux, loras, monkeypatch, tmp_path, mode, mul):
    assert _add_t5_lora(load_flux_models(str(tiny_flux["dev"]["diffusers"])).t5xxl, loras[0], 1.0) > 0
    """Hooked, merged (--network_merge) or pre-calculated (--network_pre_calc) with --network_mul m: the final
    latents are FluxPipeline's with load_lora_weights and lora scale m (plus the T5 modules by hand)."""
    extra = {"hook": [], "merge": ["--network_merge"], "pre_calc": ["--network_pre_calc"]}[mode]
    (got,) = _gen_latents(monkeypatch, tmp_path,
                          _flux(tiny_flux, loras[0]) + ["--network_mul", str(mul), *extra])
    folder = str(tiny_flux["dev"]["diffusers"])
    want = _oracle(folder, [(loras[0], mul)])
    _close(got, want)
    assert (want - _oracle(folder, [])).abs().max() > 1e-3  # the LoRA changes the image


def test_schnell(tiny_flux, loras, monkeypatch, tmp_path):
    """The dev file has no guidance-embedder modules, so it fits schnell (same widths); T5 length 512 given."""
    folder = str(tiny_flux["schnell"]["diffusers"])
    (got,) = _gen_latents(monkeypatch, tmp_path, ["--ckpt", folder, "--network_module", "networks.lora_flux",
                                                  "--network_weights", loras[0], "--network_mul", "0.9",
                                                  "--t5xxl_max_token_length", "512"])
    _close(got, _oracle(folder, [(loras[0], 0.9)], guidance=None))


def test_two_networks_and_prompt_multipliers(tiny_flux, loras, monkeypatch, tmp_path):
    """Two networks, the first merged (--network_merge_n_models 1), with --network_mul defaults; a prompt line's
    --am sets the applied one's multiplier for that line only."""
    prompts = tmp_path / "prompts.txt"
    line = f"{PROMPT} --d {SEED}"  # the seed of each line (--seed alone seeds the first image only)
    prompts.write_text(f"{line}\n{line} --am 1.3\n{line}\n", encoding="utf-8")
    got = _gen_latents(monkeypatch, tmp_path, _flux(tiny_flux, *loras) + [
        "--network_mul", "0.7", "0.4", "--network_merge_n_models", "1", "--from_file", str(prompts)], prompt="file")
    folder = str(tiny_flux["dev"]["diffusers"])
    default = _oracle(folder, [(loras[0], 0.7), (loras[1], 0.4)])
    _close(torch.cat(got), torch.cat([default, _oracle(folder, [(loras[0], 0.7), (loras[1], 1.3)]), default]))


def test_multiplier_zero_is_no_lora(tiny_flux, loras, monkeypatch, tmp_path):
    (plain,) = _gen_latents(monkeypatch, tmp_path, _flux(tiny_flux))
    for extra in ([], ["--network_merge"]):
        (zero,) = _gen_latents(monkeypatch, tmp_path, _flux(tiny_flux, loras[0]) + ["--network_mul", "0", *extra])
        assert torch.equal(zero, plain)


def test_diffusers_format_file_and_bfl_files(tiny_flux, loras, monkeypatch, tmp_path):
    """A LoRA in diffusers' own format (FluxPipeline.save_lora_weights after loading ours) on the BFL single
    files gives what ours gives on the Diffusers folder (T5 modules left out: diffusers has none)."""
    sd = {k: v for k, v in load_file(loras[0]).items() if not k.startswith("lora_te3_")}
    kohya = tmp_path / "no_t5.safetensors"
    save_file(sd, str(kohya))
    pipe = FluxPipeline.from_pretrained(str(tiny_flux["dev"]["diffusers"]), torch_dtype=torch.float32,
                                        local_files_only=True)
    pipe.load_lora_weights(str(kohya))
    layers = {part: {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="default_0").items()}
              for part, model in (("transformer", pipe.transformer), ("text_encoder", pipe.text_encoder))}
    FluxPipeline.save_lora_weights(str(tmp_path / "dl"), transformer_lora_layers=layers["transformer"],
                                   text_encoder_lora_layers=layers["text_encoder"])
    dev = tiny_flux["dev"]
    files = ["--ckpt", str(dev["transformer"]), "--ae", str(dev["ae"]), "--clip_l", str(dev["clip_l"]), "--t5xxl",
             str(dev["t5xxl"]), "--tokenizer_cache_dir", str(dev["tokenizer_cache_dir"])]
    (got,) = _gen_latents(monkeypatch, tmp_path, files + [
        "--network_module", "networks.lora_flux", "--network_weights",
        str(tmp_path / "dl" / "pytorch_lora_weights.safetensors"), "--network_mul", "0.8"])
    _close(got, _oracle(str(tiny_flux["dev"]["diffusers"]), [(str(kohya), 0.8)]))


# ---------------------------------------------------------------- refusals

def _exit_message(capsys, argv):
    with pytest.raises(SystemExit) as e:
        gen_img.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd_lora") / "sd.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(32, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return str(path)


@pytest.mark.parametrize("case, needle", [
    ("sd_module", "--network_module networks.lora cannot be used with a FLUX.1 model: FLUX.1 LoRAs are applied "
                  "by --network_module networks.lora_flux"),
    ("sd_file", "is an SD1/SD2 LoRA, but --ckpt"),
    ("mask", "--mask_path cannot be used with a FLUX.1 model"),
    ("color_codes", "--network_regional_mask_max_color_codes"),
    ("bad_args", "--network_args conv_dim: an SD U-Net option"),
])
def test_refused_before_loading(tiny_flux, loras, sd_lora, capsys, monkeypatch, tmp_path, case, needle):
    monkeypatch.setattr(gen_setup, "load_flux_models", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = {
        "sd_module": ["--network_module", "networks.lora", "--network_weights", loras[0]],
        "sd_file": ["--network_module", "networks.lora_flux", "--network_weights", sd_lora],
        "mask": ["--network_module", "networks.lora_flux", "--network_weights", loras[0], "--mask_path",
                 str(tmp_path)],
        "color_codes": ["--network_module", "networks.lora_flux", "--network_weights", loras[0],
                        "--network_regional_mask_max_color_codes", "2"],
        "bad_args": ["--network_module", "networks.lora_flux", "--network_weights", loras[0], "--network_args",
                     "conv_dim=4"],
    }[case]
    msg = _exit_message(capsys, ["--ckpt", str(tiny_flux["dev"]["diffusers"]), "--prompt", "x", *argv])
    assert needle in msg


@pytest.mark.parametrize("module", ["networks.lora_flux", "networks.lora"])
def test_flux_lora_refused_for_sd_model(loras, capsys, tmp_path, module):
    sd = tmp_path / "sd_model"
    sd.mkdir()
    msg = _exit_message(capsys, ["--ckpt", str(sd), "--prompt", "x", "--network_module", module,
                                 "--network_weights", loras[0]])
    if module == "networks.lora_flux":
        assert "--network_module networks.lora_flux is for FLUX.1 models, but --ckpt" in msg
    else:
        assert f"--network_weights {loras[0]} is a FLUX.1 LoRA, but --ckpt" in msg


@pytest.mark.parametrize("key, down, up, needle", [
    ("lora_unet_double_blocks_9_img_attn_qkv", (4, 64), (192, 4), "name no layer of this FLUX.1 model"),
    ("lora_unet_double_blocks_0_img_attn_proj", (4, 48), (64, 4), "do not fit the model's layer"),
])
def test_lora_of_another_flux_model_is_one_line(tiny_flux, capsys, tmp_path, key, down, up, needle):
    path = tmp_path / "other.safetensors"
    save_file({f"{key}.lora_down.weight": torch.ones(down), f"{key}.lora_up.weight": torch.ones(up),
               f"{key}.alpha": torch.tensor(4.0)}, str(path))
    msg = _exit_message(capsys, _flux(tiny_flux, str(path)) + ["--prompt", "x", "--outdir", str(tmp_path / "o")])
    assert needle in msg and str(path) in msg
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
