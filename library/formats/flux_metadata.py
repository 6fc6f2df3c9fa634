"""The ``ss_*`` and ``modelspec.*`` keys sd-scripts' flux_train_network.py writes into a FLUX.1 LoRA.

Upstream's ``update_metadata`` adds the FLUX options below to train_network's keys (``str(value)`` each, as
every ``ss_*`` value); ``ss_base_model_version`` is ``flux1`` and modelspec names ``flux-1-dev/lora`` or
``flux-1-schnell/lora`` with BFL's repository as implementation and no prediction type.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .metadata import base_model_version, build_minimum_network_metadata
from .modelspec import build_modelspec

FLUX_NETWORK_MODULE = "networks.lora_flux"
# option -> sd-scripts' default (library/flux_train_utils.py); written as ss_<option>
FLUX_OPTIONS = {"model_type": "flux", "apply_t5_attn_mask": False, "weighting_scheme": "uniform", "logit_mean": 0.0,
                "logit_std": 1.0, "mode_scale": 1.29, "guidance_scale": 3.5, "timestep_sampling": "sigma",
                "sigmoid_scale": 1.0, "model_prediction_type": "sigma_scaled", "discrete_flow_shift": 3.0}


def flux_training_keys(options: Mapping[str, Any]) -> dict[str, str]:
    """``ss_model_type`` … ``ss_discrete_flow_shift`` from the run's options (sd-scripts' defaults if absent)."""
    return {f"ss_{name}": str(options.get(name, default)) for name, default in FLUX_OPTIONS.items()}


def flux_lora_metadata(model_name: str, dim: Any, alpha: Any, network_args: Optional[Mapping[str, Any]],
                       options: Mapping[str, Any], *, title: Optional[str] = None,
                       timestamp: Optional[float] = None, resolution: Any = None) -> dict[str, str]:
    """The keys a FLUX.1 LoRA file carries: minimum ``ss_*`` set, FLUX training keys and modelspec.

    ``model_name``: ``dev`` or ``schnell``."""
    meta = build_minimum_network_metadata("False", base_model_version("flux", False), FLUX_NETWORK_MODULE, dim,
                                          alpha, network_args)
    meta.update(flux_training_keys(options))
    meta.update(build_modelspec(f"flux-{model_name}", False, "lora", title=title, timestamp=timestamp,
                                resolution=resolution))
    return meta
