"""The plug-in contract through ``NetworkHost`` (spec file-formats §a.3), over every kind of plug-in:
``networks.lora``, a fake module with only the required functions, and ``lycoris.kohya`` (algo=loha)."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from library.errors import UserError
from networks.network_host import NetworkHost, parse_network_args

from .helpers import unet_inputs


def _fake_plugin() -> types.ModuleType:
    """Smallest plug-in: one trainable bias added to every attention ``to_out.0``; required methods only."""

    class FakeNetwork(nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.targets = [m for n, m in unet.named_modules() if n.endswith("attn1.to_out.0")]
            self.shift = nn.ParameterList([nn.Parameter(torch.zeros(m.out_features)) for m in self.targets])

        def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
            for target, shift in zip(self.targets, self.shift):
                target.register_forward_hook(lambda mod, args, out, s=shift: out + s)

        def load_weights(self, file):
            return self.load_state_dict(torch.load(file, weights_only=True), strict=False)

        def prepare_optimizer_params(self, text_encoder_lr, unet_lr):  # the old 2-argument form
            return [{"params": list(self.parameters()), "lr": unet_lr}]

        def prepare_grad_etc(self, text_encoder, unet):
            self.requires_grad_(True)

        def on_epoch_start(self, text_encoder, unet):
            self.train()

        def get_trainable_params(self):
            return self.parameters()

        def save_weights(self, file, dtype, metadata):
            torch.save(self.state_dict(), file)

        def enable_gradient_checkpointing(self):
            pass

        def is_mergeable(self):
            return False

    module = types.ModuleType("fake_network_plugin")
    module.create_network = lambda multiplier, dim, alpha, vae, te, unet, neuron_dropout=None, **kw: FakeNetwork(unet)
    module.create_network_from_weights = lambda *a, **kw: (None, None)
    return module


PLUGINS = {
    "networks.lora": lambda: ("networks.lora", {"conv_dim": "2"}),
    "fake": lambda: (_fake_plugin(), {}),
    # LyCORIS' default "full" preset names time_embedding.linear_1 twice on a diffusers U-Net (lycoris 4.1.3)
    "lycoris.kohya": lambda: (pytest.importorskip("lycoris.kohya") and "lycoris.kohya",
                              {"algo": "loha", "preset": "attn-mlp"}),
}


def test_parse_network_args_keeps_strings():
    assert parse_network_args(["conv_dim=4", "algo = loha", "x=a=b"]) == {"conv_dim": "4", "algo": "loha", "x": "a=b"}
    assert parse_network_args(None) == {}
    with pytest.raises(UserError, match="'conv_dim4' is not key=value"):
        parse_network_args(["conv_dim4"])


def test_unknown_module_is_user_error():
    with pytest.raises(UserError, match="--network_module no_such_plugin_xyz"):
        NetworkHost("no_such_plugin_xyz")
    with pytest.raises(UserError, match="lacks create_network"):
        NetworkHost(types.ModuleType("empty_plugin"))


def test_dropout_kwarg_added_unless_given():
    seen = {}
    module = _fake_plugin()
    module.create_network = lambda *a, **kw: seen.update(kw)
    host = NetworkHost(module)
    host.create(1.0, 4, 1.0, None, None, None, network_dropout=0.1, network_args={"a": "1"})
    assert seen == {"neuron_dropout": 0.1, "a": "1", "dropout": 0.1}
    seen.clear()
    host.create(1.0, 4, 1.0, None, None, None, network_dropout=0.1, network_args={"dropout": "0.3"})
    assert seen["dropout"] == "0.3"


@pytest.mark.parametrize("plugin", list(PLUGINS))
def test_plugin_contract(tiny, tmp_path, plugin):
    module, args = PLUGINS[plugin]()
    models = tiny("sd1")
    host = NetworkHost(module)
    te = models.text_encoders[0]
    host.create(1.0, 4, 1.0, models.vae, te, models.unet, network_dropout=None, network_args=args)
    host.apply_to(te, models.unet, apply_text_encoder=True, apply_unet=True)
    host.prepare_network(None)  # optional: no-op where missing
    host.set_multiplier(1.0)
    host.prepare_grad_etc(te, models.unet)
    host.on_epoch_start(te, models.unet)
    host.on_step_start(te, models.unet)
    host.enable_gradient_checkpointing()
    groups = host.param_groups(1e-4, 1e-2, 1e-2)
    assert groups and all(isinstance(g, dict) and "params" in g for g in groups)
    params = [p for g in groups for p in g["params"]]
    assert params and {id(p) for p in params} <= {id(p) for p in host.get_trainable_params()}

    inputs, kw = unet_inputs(models)
    with torch.no_grad():
        before = models.unet(*inputs, **kw).sample
    optimizer = torch.optim.SGD(groups, lr=1e-2)
    out = models.unet(*inputs, **kw).sample
    out.pow(2).mean().backward()
    optimizer.step()
    host.network.eval()  # dropouts off for the comparison
    with torch.no_grad():
        after = models.unet(*inputs, **kw).sample
    assert (after - before).abs().max() > 0

    path = str(tmp_path / ("net.safetensors" if plugin != "fake" else "net.pt"))
    host.save_weights(path, None, {"ss_network_module": plugin})
    fresh = tiny("sd1")
    other = NetworkHost(module)
    other.create(1.0, 4, 1.0, fresh.vae, fresh.text_encoders[0], fresh.unet, network_args=args)
    other.apply_to(fresh.text_encoders[0], fresh.unet)
    other.load_weights(path)
    other.network.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(*inputs, **kw).sample, after, rtol=0, atol=1e-6)
    norm = host.apply_max_norm_regularization(1.0, "cpu")
    assert norm is None or len(norm) == 3
    assert isinstance(host.is_mergeable(), bool)
