"""The sections of a run's settings besides the loop's (``loop.py``): frozen, typed, built once by
``from_options.build_settings`` right after the options are parsed and resolved."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from library.training.objective.losses import LossConfig
from library.training.objective.noise import NoiseConfig


@dataclass(frozen=True)
class TextSettings:
    """How captions become U-Net conditioning."""

    clip_skip: Optional[int] = None
    max_token_length: Optional[int] = None  # None: 75 tokens; 150 / 225: two or three chunks
    weighted_captions: bool = False  # (word:1.2) weights in captions (SD1/SD2)


@dataclass(frozen=True)
class ObjectiveSettings:
    """Noise, timesteps, loss (spec losses) and the schedule's two switches."""

    noise: NoiseConfig
    loss: LossConfig
    zero_terminal_snr: bool = False
    v_parameterization: bool = False


@dataclass(frozen=True)
class MethodSettings:
    """What the trainers' method objects read beyond the objective."""

    gradient_checkpointing: bool = False
    scale_weight_norms: Optional[float] = None  # network trainers: max-norm regularization
    stop_text_encoder_training: Optional[int] = None  # train_db: None whole run, < 0 never, N until step N
    no_token_padding: bool = False  # train_db: pad to the longest caption of the batch
    train_text_encoder: bool = False  # fine_tune


@dataclass(frozen=True)
class SaveSettings:
    """Where and when models and states are saved, and which old ones are removed (spec cli-options §4.5)."""

    output_dir: str = "."
    output_name: Optional[str] = None
    save_every_n_epochs: Optional[int] = None
    save_n_epoch_ratio: Optional[int] = None
    save_every_n_steps: Optional[int] = None
    save_last_n_epochs: Optional[int] = None
    save_last_n_epochs_state: Optional[int] = None
    save_last_n_steps: Optional[int] = None
    save_last_n_steps_state: Optional[int] = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    save_state_to_huggingface: bool = False


@dataclass(frozen=True)
class ResumeSettings:
    """``--resume``: a local state folder, or a hub location with ``--resume_from_huggingface``."""

    resume: Optional[str] = None
    from_huggingface: bool = False
    inexact: bool = False  # --resume_inexact: accept a state whose RNG file does not match this process count


@dataclass(frozen=True)
class HubSettings:
    """``--huggingface_*`` / ``--async_upload``: uploads of saved files, downloads of a state to resume."""

    repo_id: Optional[str] = None
    repo_type: Optional[str] = None
    path_in_repo: Optional[str] = None
    token: Optional[str] = None
    private: bool = True  # anything but --huggingface_repo_visibility public, as sd-scripts
    async_upload: bool = False


@dataclass(frozen=True)
class EmaSettings:
    """``--ema*``: an exponential moving average of the trained weights."""

    enabled: bool = False
    decay: float = 0.9999
    update_after_step: int = 0
    power: Optional[float] = None  # None: decay = min(decay, (1 + step) / (10 + step))
    every_n_steps: int = 1
    device: str = "gpu"  # "cpu" keeps the shadow weights in CPU memory
    sample_with_ema: bool = False


@dataclass(frozen=True)
class ValidationSettings:
    """Validation loss on the held-out ``validation_split`` images."""

    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None  # both None: after every epoch
    max_steps: Optional[int] = None
    seed: int = 0
