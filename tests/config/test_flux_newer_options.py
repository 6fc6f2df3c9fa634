"""A FLUX config written for current sd-scripts carries options v0.8.7 has not (cpu_offload_checkpointing,
initial_step, huber_scale, ...): at upstream's defaults it loads, any other value is one line naming the option."""
from __future__ import annotations

import pytest

import flux_train_network
from library.config.options_flux import NEWER_UPSTREAM_OPTIONS
from tests.training.test_flux_train_network import run_args
from tests.training.train_helpers import make_shapes_folder

DEFAULTS = """cpu_offload_checkpointing = false
initial_epoch = ""
skip_until_initial_step = false
fused_backward_pass = false
huber_scale = 1.0
lr_decay_steps = 0
skip_cache_check = false
log_config = false
"""


def _config(tmp_path, tiny_flux, body: str):
    data = make_shapes_folder(tmp_path / "data", n=1)
    argv = run_args(tiny_flux["dev"], data, tmp_path / "out", 1, "--dry_run")
    cfg = tmp_path / "c.toml"
    cfg.write_text(body, encoding="utf-8")
    return argv + ["--config_file", str(cfg)]


def test_defaults_of_current_upstream_load(tiny_flux, tmp_path, capsys):
    flux_train_network.main(_config(tmp_path, tiny_flux, DEFAULTS))
    assert "dry run of flux_train_network.py" in capsys.readouterr().out


@pytest.mark.parametrize("line", ["cpu_offload_checkpointing = true", "initial_step = 10", "huber_scale = 2.0",
                                  "lr_decay_steps = 0.2", "resize_interpolation = \"lanczos\""])
def test_other_values_are_one_line(tiny_flux, tmp_path, capsys, line):
    with pytest.raises(SystemExit) as e:
        flux_train_network.main(_config(tmp_path, tiny_flux, line + "\n"))
    assert e.value.code == 2
    name = line.split(" ")[0]
    assert name in NEWER_UPSTREAM_OPTIONS
    assert f"--{name} is an option of current sd-scripts that is not supported here yet" in capsys.readouterr().err
