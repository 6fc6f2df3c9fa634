"""Helpers of the FLUX.1 LoRA tests: tiny models, one transformer call, random LoRA factors."""
from __future__ import annotations

import copy

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from library.models.flux_tiny import build_tiny_flux

_BUILT = {}


def tiny_flux_models(name: str = "dev"):
    """A fresh copy of the tiny FLUX.1 ``name`` (built once per process)."""
    if name not in _BUILT:
        _BUILT[name] = build_tiny_flux(name)
    return copy.deepcopy(_BUILT[name])


def transformer_inputs(transformer, seed: int = 0) -> dict:
    """Keyword inputs of one ``FluxTransformer2DModel`` call: 16 image tokens, 5 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    inputs = dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=gen),
                  encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=gen),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
                  timestep=torch.tensor([0.7]), img_ids=torch.rand(16, 3, generator=gen) * 4,
                  txt_ids=torch.zeros(5, 3))
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


@torch.no_grad()
def run_transformer(transformer, seed: int = 0) -> torch.Tensor:
    return transformer(**transformer_inputs(transformer, seed), return_dict=False)[0]


def randomize(network, seed: int = 0, std: float = 0.1) -> None:
    """Random ``lora_down`` and ``lora_up`` (up starts at zero, which would make every test trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.text_encoder_loras + network.unet_loras:
            for w in (lora.lora_down.weight, lora.lora_up.weight):
                w.copy_(torch.randn(w.shape, generator=gen) * std)


def save_peft_lora(transformer, targets: list[str], folder, seed: int = 1):
    """A random rank-3 PEFT LoRA on ``targets`` of ``transformer`` (left attached), written by
    ``FluxPipeline.save_lora_weights`` into ``folder``; returns the file's path (diffusers' own FLUX format)."""
    from pathlib import Path

    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer.add_adapter(LoraConfig(r=3, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer))
    return Path(folder) / "pytorch_lora_weights.safetensors"


def pipeline(m) -> FluxPipeline:
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=m.ae, text_encoder=m.clip_l,
                        tokenizer=m.tokenizers[0], text_encoder_2=m.t5xxl, tokenizer_2=m.tokenizers[1],
                        transformer=m.transformer)


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """module path -> scaling · B @ A of every PEFT LoRA layer diffusers injected."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default_0" in getattr(module, "lora_A", {}):
            found[name] = (module.lora_B["default_0"].weight @ module.lora_A["default_0"].weight
                           * module.scaling["default_0"])
    return found


def our_deltas(network, model) -> dict[str, torch.Tensor]:
    """module path -> the delta our network adds to that layer's weight."""
    paths = {id(module): name for name, module in model.named_modules()}
    return {paths[id(layer)]: delta for lora in network.text_encoder_loras + network.unet_loras
            for layer, delta in lora.layer_deltas() if id(layer) in paths}

def assert_same_deltas(network, pairs) -> None:
    """For each (our model, diffusers' model): the PEFT layers diffusers injected are exactly our network's
    layers, each with our weight delta."""
    for ours, theirs in pairs:
        want, got = our_deltas(network, ours), peft_deltas(theirs)
        assert sorted(got) == sorted(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
