"""``TrainSettings``: one frozen object with a section per concern, what everything below the runner reads."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.option_record import OptionRecord
from library.training.settings.loop import LoopSettings
from library.training.settings.sections import (EmaSettings, HubSettings, MethodSettings, ObjectiveSettings,
                                                ResumeSettings, SaveSettings, TextSettings, ValidationSettings)


@dataclass(frozen=True)
class TrainSettings:
    """A run's settings, built once from the resolved options (``from_options.build_settings``).

    ``options`` is the read-only record of every resolved option: what metadata, modelspec, receipts and
    trackers write down and what a network plug-in's ``prepare_network`` receives. Behaviour reads the sections.
    """

    script: str
    text: TextSettings
    objective: ObjectiveSettings
    method: MethodSettings
    loop: LoopSettings
    saving: SaveSettings
    resume: ResumeSettings
    hub: HubSettings
    ema: EmaSettings
    validation: ValidationSettings
    options: OptionRecord
