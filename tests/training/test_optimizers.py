"""Optimizer registry contract, argument parsing and ss_optimizer metadata (spec cli-options §8)."""
import importlib.util

import pytest
import torch

from library.errors import UserError
from library.training.optim.optimizers import OPTIMIZERS, build_optimizer, optimizer_metadata_name, parse_kwargs

PACKAGE_OF = {"Lion": "lion_pytorch", "Prodigy": "prodigyopt", "AdaFactor": "transformers"}


def _package(name: str) -> str:
    if name.endswith("8bit") or name.startswith("Paged"):
        return "bitsandbytes"
    if name.startswith("DAdapt"):
        return "dadaptation"
    return PACKAGE_OF.get(name, "torch")


def _params():
    return [torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))]


def _step(opt, params):
    loss = sum((p**2).sum() for p in params)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_registry_contract(name):
    package = _package(name)
    params = _params()
    lr = 1.0 if name.startswith("DAdapt") or name == "Prodigy" else 0.1
    if importlib.util.find_spec(package) is None:
        with pytest.raises(UserError, match=f"--optimizer_type {name} needs {package}: pip install {package}"):
            build_optimizer(params, name, lr)
        return
    before = params[0].detach().clone()
    opt, ss_name, extra = build_optimizer(params, name, lr)
    assert isinstance(opt, torch.optim.Optimizer)
    assert ss_name.startswith(f"{type(opt).__module__}.{type(opt).__name__}")
    for _ in range(3):
        _step(opt, params)
    assert not torch.equal(before, params[0].detach())
    assert isinstance(extra["optimizer_kwargs"], dict)


def test_bitsandbytes_message_is_exact():
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes installed")
    with pytest.raises(UserError) as e:
        build_optimizer(_params(), "AdamW8bit", 1e-3)
    assert str(e.value) == "--optimizer_type AdamW8bit needs bitsandbytes: pip install bitsandbytes"
    with pytest.raises(UserError, match="AdamW8bit needs bitsandbytes"):
        build_optimizer(_params(), None, 1e-3, use_8bit_adam=True)


def test_names_are_case_insensitive_and_default_is_adamw():
    assert type(build_optimizer(_params(), "adamw", 1e-3)[0]) is torch.optim.AdamW
    assert type(build_optimizer(_params(), "", 1e-3)[0]) is torch.optim.AdamW
    assert type(build_optimizer(_params(), None, 1e-3)[0]) is torch.optim.AdamW
    assert type(build_optimizer(_params(), "sgdnesterov", 1e-3)[0]) is torch.optim.SGD


def test_custom_classes_and_unknown_names():
    opt, name, _ = build_optimizer(_params(), "RMSprop", 1e-3)
    assert type(opt) is torch.optim.RMSprop and name == "torch.optim.rmsprop.RMSprop"
    opt, _, _ = build_optimizer(_params(), "torch.optim.Adagrad", 1e-3, ["lr_decay=0.01"])
    assert type(opt) is torch.optim.Adagrad and opt.defaults["lr_decay"] == 0.01
    with pytest.raises(UserError, match="unknown optimizer; use one of AdamW, AdamW8bit"):
        build_optimizer(_params(), "NoSuchOpt", 1e-3)
    with pytest.raises(UserError, match="no_such_pkg.Opt: unknown optimizer"):
        build_optimizer(_params(), "no_such_pkg.Opt", 1e-3)
    with pytest.raises(UserError, match="unknown 8-bit optimizer"):
        build_optimizer(_params(), "Foo8bit", 1e-3)


def test_legacy_flags():
    assert type(build_optimizer(_params(), "", 1e-3, use_lion_optimizer=True)[0]).__name__ == "Lion"
    with pytest.raises(UserError, match="--use_lion_optimizer cannot be combined with --optimizer_type"):
        build_optimizer(_params(), "AdamW", 1e-3, use_lion_optimizer=True)
    with pytest.raises(UserError, match="--use_8bit_adam cannot be combined"):
        build_optimizer(_params(), "Lion", 1e-3, use_8bit_adam=True)
    with pytest.raises(UserError, match="together"):
        build_optimizer(_params(), None, 1e-3, use_8bit_adam=True, use_lion_optimizer=True)


def test_optimizer_args_parsing():
    kw = parse_kwargs(["betas=0.9,0.999", "weight_decay=0.01", "decouple=True", "mode=fast", "eps=1e-8",
                       "step_rules=1:10,0.1"])
    assert kw == {"betas": (0.9, 0.999), "weight_decay": 0.01, "decouple": True, "mode": "fast", "eps": 1e-8,
                  "step_rules": "1:10,0.1"}
    assert parse_kwargs(None) == {}
    with pytest.raises(UserError, match="--optimizer_args: expected key=value"):
        parse_kwargs(["betas"])
    opt, _, _ = build_optimizer(_params(), "AdamW", 1e-3, ["betas=0.8,0.99", "weight_decay=0.1"])
    assert opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["weight_decay"] == 0.1


def test_ss_optimizer_string():
    opt, name, _ = build_optimizer(_params(), "AdamW", 1e-3)
    assert name == "torch.optim.adamw.AdamW"
    _, name, _ = build_optimizer(_params(), "AdamW", 1e-3, ["weight_decay=0.01", "betas=0.9,0.999"])
    assert name == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999))"
    # defaults filled in by the builder show up, as upstream
    _, name, _ = build_optimizer(_params(), "SGDNesterov", 1e-3)
    assert name == "torch.optim.sgd.SGD(momentum=0.9)"
    assert optimizer_metadata_name(opt, {}) == "torch.optim.adamw.AdamW"


def test_adafactor_relative_step_default():
    groups = [{"params": _params(), "lr": 1e-4}, {"params": _params(), "lr": 2e-4}]
    opt, name, extra = build_optimizer(groups, "AdaFactor", 1e-3)
    assert name == "transformers.optimization.Adafactor(relative_step=True)"
    assert extra["lr_scheduler"] == "adafactor:0.001"
    assert extra["learning_rate"] is None and extra["group_lrs_ignored"]
    assert all(g["lr"] is None and g["relative_step"] for g in opt.param_groups)
    _step(opt, groups[0]["params"] + groups[1]["params"])


def test_adafactor_without_relative_step_keeps_lr():
    opt, name, extra = build_optimizer(_params(), "adafactor", 1e-3, ["relative_step=False", "scale_parameter=False"])
    assert extra["lr_scheduler"] is None and extra["learning_rate"] == 1e-3
    assert opt.param_groups[0]["lr"] == 1e-3 and not opt.param_groups[0]["relative_step"]
    # warmup_init forces relative_step back on
    _, _, extra = build_optimizer(_params(), "AdaFactor", 1e-3, ["relative_step=False", "warmup_init=True"])
    assert extra["optimizer_kwargs"]["relative_step"] is True and extra["lr_scheduler"] == "adafactor:0.001"


def test_dadapt_low_lr_warns(caplog):
    pytest.importorskip("dadaptation")
    with caplog.at_level("WARNING"):
        build_optimizer([{"params": _params(), "lr": 0.05}, {"params": _params(), "lr": 1.0}], "DAdaptAdam", 1.0)
    assert "too low" in caplog.text and "only the first learning rate" in caplog.text
