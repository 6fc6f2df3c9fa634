"""Typed, frozen run settings (issue 17 item 1): built once by ``from_options.build_settings`` right after the
options are parsed; nothing below the runners reads the argparse ``Namespace``."""
from library.training.settings.loop import LoopPlan, LoopSettings, loop_plan
from library.training.settings.sections import (EmaSettings, HubSettings, MethodSettings, ObjectiveSettings,
                                                ResumeSettings, SaveSettings, TextSettings, ValidationSettings)
from library.training.settings.train_settings import TrainSettings

__all__ = ["LoopPlan", "LoopSettings", "loop_plan", "EmaSettings", "HubSettings", "MethodSettings",
           "ObjectiveSettings", "ResumeSettings", "SaveSettings", "TextSettings", "ValidationSettings",
           "TrainSettings"]
