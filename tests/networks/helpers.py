"""Helpers shared by the network tests."""
from __future__ import annotations

import torch


def text_encoder_arg(models):
    """What ``create_network`` receives: one encoder for SD1/SD2, the list for SDXL (spec §a.3)."""
    return models.text_encoders if models.family == "sdxl" else models.text_encoders[0]


def randomize_up(network, seed: int = 0, std: float = 0.1) -> None:
    """Non-zero ``lora_up`` weights (they start at zero, so the network would otherwise be a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.text_encoder_loras + network.unet_loras:
            w = lora.lora_up.weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)


def unet_inputs(models, batch: int = 2, seed: int = 0) -> tuple[tuple, dict]:
    """Positional and keyword inputs of one U-Net call (SDXL adds size conditioning)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = models.unet.config
    x = torch.randn(batch, cfg.in_channels, 8, 8, generator=gen)
    t = torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2))
    ctx = torch.randn(batch, 7, cfg.cross_attention_dim, generator=gen)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=gen),
                                       "time_ids": torch.randn(batch, 6, generator=gen)}
    return (x, t, ctx), kwargs


def token_ids(batch: int = 2, length: int = 77, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def write_lora(models, path, seed=0, dim=4, alpha=2.0, conv_dim="2", conv_alpha="1", metadata=None) -> str:
    """A LoRA for ``models`` with random (non-zero) factors saved through the network; returns its path."""
    import networks.lora as lora

    net = lora.create_network(1.0, dim, alpha, None, text_encoder_arg(models), models.unet, conv_dim=conv_dim,
                              conv_alpha=conv_alpha)
    randomize_up(net, seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 100)
        for p in net.parameters():
            if p.ndim:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    net.save_weights(str(path), None, metadata or {"ss_v2": "False", "ss_base_model_version": "sd_v1"})
    return str(path)


def assert_clamped_svd_factors(sd, name: str, delta: torch.Tensor, rank: int, clamp_quantile: float = 0.99) -> None:
    """``sd``'s factors of module ``name`` are the best rank-``rank`` factors of ``delta`` computed here
    (``up = U_r·S_r``, ``down = V_rᵀ``, both clamped to ±the quantile of their values, spec utilities §8)."""
    u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
    torch.testing.assert_close(sd[f"{name}.lora_up.weight"].flatten(1), up.clamp(-hi, hi), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sd[f"{name}.lora_down.weight"].flatten(1), down.clamp(-hi, hi), atol=1e-5, rtol=1e-4)
    assert float(sd[f"{name}.alpha"]) == rank
