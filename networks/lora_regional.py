"""Regional LoRA during generation: each network acts on its own sub-prompt and its own region of the image.

The semantics are sd-scripts v0.8.7's (networks/lora.py ``LoRAInfModule`` with ``set_region`` /
``set_current_generation``), for a U-Net batch laid out as gen_img lays it out:

* text encoder input rows: the negative prompts (B), then every image's sub-prompts (B·N, image-major), each
  prompt spread over its chunks; network k's text-encoder LoRA acts on the rows of sub-prompt k only;
* U-Net: latents [uncond (B), cond (B)], cross-attention context [uncond (B), sub-prompts (B·N)]; the
  cross-attention query is repeated per sub-prompt (by the last network's ``attn2 to_q`` module) and the
  sub-prompt results are blended by the region masks (by the last network's ``attn2 to_out`` module);
* every other U-Net module's delta is multiplied by its network's mask resized to the activation, looked up by
  the activation's area in a table of sizes (:func:`mask_sizes`); an area not in the table gets ``1/N``;
  ``time_emb`` modules act unmasked.

A network's state lives in one :class:`RegionState` that all its modules share (``LoRAModule.region``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# upstream blends the sub-prompt attention outputs by mask / (sum of masks + this)
MASK_SUM_EPS = 1e-4


def mask_sizes(width: int, height: int, ds_ratio: float | None = None) -> list[tuple[int, int]]:
    """The (h, w) latent sizes a region mask is prepared for, in upstream's order (later entries win an area).

    From the latent size (width/8, height/8), halved (rounded up) four times; an odd size also gets the size
    rounded up to even, and Deep Shrink's ratio adds ``int(size · ratio)``."""
    h, w = height // 8, width // 8
    sizes = []
    for _ in range(4):
        sizes.append((h, w))
        if h % 2 == 1 or w % 2 == 1:
            sizes.append((h + h % 2, w + w % 2))
        if ds_ratio is not None:
            sizes.append((int(h * ds_ratio), int(w * ds_ratio)))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


def region_mask(mask: torch.Tensor) -> torch.Tensor:
    """A network's region: an all-zero mask means the whole image (upstream's ``set_region``)."""
    mask = mask.float()
    return torch.ones_like(mask) if float(mask.max()) == 0 else mask


def build_mask_table(mask: torch.Tensor, width: int, height: int, dtype: torch.dtype, device: torch.device | str,
                     ds_ratio: float | None = None) -> dict[int, torch.Tensor]:
    """Area -> the (H, W) mask bilinearly resized to that (1, 1, h, w) size (resized in float32, then cast)."""
    table = {}
    for h, w in mask_sizes(width, height, ds_ratio):
        resized = F.interpolate(mask.float()[None, None], (h, w), mode="bilinear")
        table[h * w] = resized.to(device=device, dtype=dtype)
    return table


def module_role(lora_name: str) -> str:
    """How a module acts in regional generation, by its name as upstream decides it.

    "text": text encoder (its sub-prompt only); "sub_prompt": cross-attention key/value (its sub-prompt's context
    rows); "plain": time embedding (unchanged); "query" / "out": cross-attention query / output (regional, plus the
    last network's repeat / blend); "regional": everything else (delta times the resized mask).

    Unlike upstream, SDXL's ``lora_te1_`` / ``lora_te2_`` modules count as text-encoder modules (upstream only
    recognises ``lora_te_``, so SDXL's text-encoder LoRAs act at 1/N strength on every prompt)."""
    if lora_name.startswith("lora_te"):
        return "text"
    if "attn2_to_k" in lora_name or "attn2_to_v" in lora_name:
        return "sub_prompt"
    if "time_emb" in lora_name:
        return "plain"
    if "attn2_to_q" in lora_name:
        return "query"
    if "attn2_to_out" in lora_name:
        return "out"
    return "regional"


@dataclass
class RegionState:
    """One network's part in regional generation (upstream's network attributes of the same names)."""

    sub_prompt_index: int
    is_last_network: bool
    mask: torch.Tensor  # (H, W) in [0, 1]
    batch_size: int = 0
    num_sub_prompts: int = 0
    mask_table: dict[int, torch.Tensor] | None = None  # None until a generation is set: modules act as usual
    shared: dict[str, Any] = field(default_factory=dict)  # one dict for all networks of the batch

    @property
    def active(self) -> bool:
        return self.mask_table is not None

    def set_generation(self, batch_size: int, num_sub_prompts: int, width: int, height: int, shared: dict,
                       dtype: torch.dtype, device: torch.device | str, ds_ratio: float | None = None) -> None:
        self.batch_size, self.num_sub_prompts, self.shared = batch_size, num_sub_prompts, shared
        self.mask_table = build_mask_table(self.mask, width, height, dtype, device, ds_ratio)

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The mask for activation ``x`` (upstream's ``get_mask_for_x``): by area, (1,1,h,w) or (1,hw,1);
        2-D activations and areas without a table entry get ``1/N`` everywhere."""
        area = x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]
        mask = self.mask_table.get(area)
        if mask is None or x.ndim == 2:
            size = (1, x.shape[1]) if x.ndim == 2 else (1, *x.shape[1:-1], 1)
            return torch.ones(size, dtype=x.dtype, device=x.device) / self.num_sub_prompts
        return mask.reshape(1, -1, 1) if x.ndim == 3 else mask

    def sub_prompt_rows(self, n_rows: int, offset: int) -> list[int]:
        """Rows of this network's sub-prompt in a batch of ``offset`` leading rows then B·N sub-prompt rows,
        each prompt spread over ``n_rows / (offset + B·N)`` consecutive rows (text-encoder chunks)."""
        prompts = offset + self.batch_size * self.num_sub_prompts
        per_prompt = max(n_rows // prompts, 1)
        return [r for r in range(n_rows) if r // per_prompt >= offset
                and (r // per_prompt - offset) % self.num_sub_prompts == self.sub_prompt_index]


def regional_output(lora: Any, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The output of ``lora``'s layer in regional generation (``x`` the layer input, ``output`` the output so far:
    the layer's own plus the earlier networks' contributions)."""
    state: RegionState = lora.region
    role = module_role(lora.lora_name)
    b = state.batch_size
    if role == "plain":
        return output + lora.lora_delta(x).to(output.dtype)
    if role in ("text", "sub_prompt"):
        # text encoder: the negatives (B rows) come first; U-Net context: the uncond rows (B) come first
        rows = state.sub_prompt_rows(x.shape[0], offset=b)
        if not rows:
            return output
        output = output.clone()
        output[rows] = output[rows] + lora.lora_delta(x[rows]).to(output.dtype)
        return output
    if role == "out":
        return _blend_sub_prompts(lora, state, x, output)
    delta = lora.lora_delta(x)
    output = output + (delta * state.mask_for(delta)).to(output.dtype)
    if role == "query" and state.is_last_network:
        # one query per sub-prompt: [uncond (B), image 0 × N, image 1 × N, ...]
        output = torch.cat([output[:b], output[b:2 * b].repeat_interleave(state.num_sub_prompts, dim=0)])
    return output


def _blend_sub_prompts(lora: Any, state: RegionState, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Cross-attention output: each network records its sub-prompt's delta and mask; the last network blends
    every image's N sub-prompt rows into one: Σ m_k·out_k / (Σ m_k + 1e-4) + Σ m_k·Δ_k (upstream's
    ``to_out_forward``). Sub-prompts without a network have mask 0; the uncond rows pass unchanged."""
    b, n, k = state.batch_size, state.num_sub_prompts, state.sub_prompt_index
    x_k = x[b + k::n][:b]
    delta = lora.lora_delta(x_k)
    records = state.shared.setdefault(lora.lora_name, {})
    records[k] = (delta, state.mask_for(delta))
    if not state.is_last_network:
        return output
    state.shared.pop(lora.lora_name)
    zero_mask = torch.zeros_like(records[k][1])
    masks = torch.cat([records[i][1] if i in records else zero_mask for i in range(n)])  # (N, HW, 1)
    mask_sum = masks.sum(dim=0) + MASK_SUM_EPS
    blended = [output[:b]]
    for i in range(b):
        sub_outputs = output[b + i * n: b + (i + 1) * n]
        deltas = torch.stack([records[j][0][i] if j in records else torch.zeros_like(delta[i]) for j in range(n)])
        mixed = (sub_outputs * masks).sum(dim=0) / mask_sum + (deltas.to(output.dtype) * masks).sum(dim=0)
        blended.append(mixed[None].to(output.dtype))
    return torch.cat(blended)


__all__ = ["MASK_SUM_EPS", "RegionState", "build_mask_table", "mask_sizes", "module_role", "region_mask",
           "regional_output"]
