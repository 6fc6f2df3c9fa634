"""Stop at the first NaN/Inf and say where it came from (docs/beyond-sd-scripts.md §3).

The sites of one forward pass (VAE latents, text-encoder output, U-Net output) record a device-side
"all finite" flag through :func:`watch`; nothing is synchronised there. The loop then reads the loss,
these flags and (with ``--check_grads``) the per-group gradient norms in ONE transfer per micro-step,
the same single sync the loop needs anyway to log the loss, and stops before the optimizer step, so the
weights, the optimizer state and every earlier checkpoint stay as they were before the bad step.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, Optional, Sequence

import torch

from library.errors import NonFiniteError

logger = logging.getLogger(__name__)

# pipeline order: the first bad site is the cause, later ones only inherit it
SITES = ("VAE latents", "text-encoder output", "U-Net output", "loss")
_BF16_NOT_FP16 = "use --mixed_precision bf16 instead of fp16"


def remedies_for(precision: Optional[str] = None, *, full_fp16: bool = False, full_bf16: bool = False,
                 max_grad_norm: Optional[float] = 1.0, no_half_vae: bool = False) -> dict[str, str]:
    """The likely remedy per site, fitted to the precision in use: bf16 is suggested only to an fp16 run,
    ``--no_half_vae`` only when the VAE runs in half precision, clipping as ``--max_grad_norm`` stands.
    ``precision`` None: nothing known, every hint applies. Key ``"gradient"``: for a parameter group ``{group}``."""
    precision = "fp16" if precision is None else precision
    fp16 = precision == "fp16" or full_fp16
    half = fp16 or precision == "bf16" or full_bf16
    clip = max_grad_norm
    lower = [f"lower --learning_rate or --max_grad_norm (now {clip:g})"] if clip else \
        ["lower --learning_rate", "clip gradients (--max_grad_norm 1.0)"]
    clipping = f"lower --max_grad_norm (now {clip:g})" if clip else "clip gradients (--max_grad_norm 1.0)"
    cache = "; with a latent cache, delete it and cache again"
    if half and not no_half_vae:
        fixed = " (or a VAE fixed for fp16)" if fp16 else ""
        vae = f"the VAE fails in {'fp16' if fp16 else 'bf16'}: use --no_half_vae{fixed}{cache}"
    else:
        vae = f"the VAE gives NaN/Inf even in full precision: check the VAE (--vae) and the training images{cache}"
    full = [f"drop --{name} (weights kept in half precision lose small updates)"
            for name, on in (("full_fp16", full_fp16), ("full_bf16", full_bf16)) if on]
    diverged = "the weights diverged or fp16 overflowed" if fp16 else "the weights diverged"
    bf16 = [_BF16_NOT_FP16] if fp16 else []
    return {
        "VAE latents": vae,
        "text-encoder output": _any_of(bf16 + ["lower the text encoder's learning rate"]),
        "U-Net output": f"{diverged}: {_any_of(bf16 + lower + full)}",
        "loss": f"{diverged}: {_any_of(bf16 + lower + full)}",
        "gradient": _any_of(["lower the learning rate of '{group}'", clipping] + bf16 + full),
    }


def _any_of(steps: list[str]) -> str:
    return steps[0] if len(steps) == 1 else ", ".join(steps[:-1]) + ", or " + steps[-1]


REMEDIES = remedies_for()  # precision unknown: every hint

_active: Optional["NonFiniteGuard"] = None


def watch(site: str, tensor: Optional[torch.Tensor]) -> None:
    """Record whether ``tensor`` is all finite at ``site`` (no-op outside a guarded forward)."""
    if _active is not None and tensor is not None:
        _active.record(site, tensor)


def group_grad_norms(param_groups: Sequence[dict]) -> list[torch.Tensor]:
    """L2 norm of each optimizer parameter group's gradients, as device tensors (no sync)."""
    norms = []
    for group in param_groups:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads:
            norms.append(torch.zeros(()))
            continue
        per_param = torch._foreach_norm(grads)
        norms.append(torch.linalg.vector_norm(torch.stack([n.float() for n in per_param])))
    return norms


class NonFiniteGuard:
    """Collects the site flags of one micro-step and checks them with the loss in one transfer."""

    def __init__(self, check_grads: bool = False, grad_scaler_active: bool = False,
                 remedies: Optional[dict[str, str]] = None):
        self.check_grads = check_grads
        self.remedies = remedies or REMEDIES
        # fp16 loss scaling makes inf gradients routine: the scaler skips those steps itself
        self.grad_scaler_active = grad_scaler_active
        self._flags: list[tuple[str, torch.Tensor]] = []

    def record(self, site: str, tensor: torch.Tensor) -> None:
        self._flags.append((site, torch.isfinite(tensor.detach()).all()))

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Make :func:`watch` record into this guard while the method computes its loss."""
        global _active
        previous, _active = _active, self
        self._flags = []
        try:
            yield
        finally:
            _active = previous

    def check(self, loss: torch.Tensor, step: int, grad_norms: Sequence[torch.Tensor] = (),
              group_names: Sequence[str] = ()) -> tuple[float, dict]:
        """Return ``(loss value, {"grad_norm/<group>": norm})``; raise :class:`NonFiniteError` on NaN/Inf."""
        device = loss.device
        parts = [loss.detach().float().reshape(())]
        parts += [flag.to(device).float() for _, flag in self._flags]
        parts += [n.to(device).float().reshape(()) for n in grad_norms]
        values = torch.stack(parts).tolist()  # the one sync of this micro-step
        current, flags, norms = values[0], values[1:1 + len(self._flags)], values[1 + len(self._flags):]
        bad_sites = {site for (site, _), ok in zip(self._flags, flags) if ok < 1.0}
        self._flags = []  # consumed: the next micro-step records its own
        if not math.isfinite(current):
            bad_sites.add("loss")
        for site in SITES:
            if site in bad_sites:
                raise NonFiniteError(_message(site, step, self.remedies[site], current))
        logs = {f"grad_norm/{name}": value for name, value in zip(group_names, norms)}
        for name, value in zip(group_names, norms):
            if math.isfinite(value):
                continue
            if self.grad_scaler_active:
                logger.info("step %d: non-finite gradient of %s, skipped by the fp16 loss scaler", step, name)
                continue
            raise NonFiniteError(_message(f"gradient of parameter group '{name}'", step,
                                          self.remedies["gradient"].replace("{group}", name), current))
        return current, logs


def _message(site: str, step: int, remedy: str, loss: float) -> str:
    return (f"non-finite values (NaN/Inf) in the {site} at step {step} (loss {loss}): {remedy}. "
            "Training stopped before this step changed the weights; earlier checkpoints are intact")
