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
_HALF = "use --mixed_precision bf16 instead of fp16"
REMEDIES = {
    "VAE latents": "the VAE overflows in half precision: use --no_half_vae (or a VAE fixed for fp16); "
                   "with a latent cache, delete it and cache again",
    "text-encoder output": f"{_HALF}, or lower the text encoder's learning rate",
    "U-Net output": f"the weights diverged or fp16 overflowed: {_HALF}, lower --learning_rate, "
                    "keep --max_grad_norm",
    "loss": f"the weights diverged or fp16 overflowed: {_HALF}, lower --learning_rate, keep --max_grad_norm",
}

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

    def __init__(self, check_grads: bool = False, grad_scaler_active: bool = False):
        self.check_grads = check_grads
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
                raise NonFiniteError(_message(site, step, REMEDIES[site], current))
        logs = {f"grad_norm/{name}": value for name, value in zip(group_names, norms)}
        for name, value in zip(group_names, norms):
            if math.isfinite(value):
                continue
            if self.grad_scaler_active:
                logger.info("step %d: non-finite gradient of %s, skipped by the fp16 loss scaler", step, name)
                continue
            raise NonFiniteError(_message(f"gradient of parameter group '{name}'", step,
                                          f"lower the learning rate of '{name}', keep gradient clipping "
                                          f"(--max_grad_norm 1.0), or {_HALF}", current))
        return current, logs


def _message(site: str, step: int, remedy: str, loss: float) -> str:
    return (f"non-finite values (NaN/Inf) in the {site} at step {step} (loss {loss}): {remedy}. "
            "Training stopped before this step changed the weights; earlier checkpoints are intact")
