"""--blocks_to_swap: the block swapper keeps at most n - k blocks resident, never computes with a parked block
(on the CPU a parked block's weights are empty tensors, so any use fails), and changes no number: forward,
backward (with and without gradient checkpointing) and inference equal the same model without swapping."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.models.flux_tiny import build_tiny_flux
from library.training.memory.block_swap import BlockSwap, enable_flux_block_swap, flux_block_split

BLOCKS = (4, 6)


def _inputs(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    tokens, text = 16, 5
    x = torch.randn(1, tokens, cfg.in_channels, generator=g, requires_grad=True)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(hidden_states=x, encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text, 3), return_dict=False)


def _models(checkpointing: bool):
    plain = build_tiny_flux("dev", seed=3, blocks=BLOCKS).transformer
    plain.requires_grad_(False)
    plain.x_embedder.requires_grad_(True)  # a trained part before every block: gradients pass through them all
    swapped = copy.deepcopy(plain)
    for m in (plain, swapped):
        m.train()
        if checkpointing:
            m.enable_gradient_checkpointing()
    return plain, swapped




@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("to_swap", [1, 3, 4])
def test_training_steps_equal_the_unswapped_model(checkpointing, to_swap):
    plain, swapped = _models(checkpointing)
    swaps = enable_flux_block_swap(swapped, to_swap, "cpu")
    double, single = flux_block_split(to_swap, *BLOCKS)
    assert [s.n - s.capacity for s in swaps] == [c for c in (double, single) if c]
    parked_at_start = sum(1 for s in swaps for i in range(s.n) if i not in s.resident)
    assert parked_at_start == double + single
    for step in range(2):  # the second step starts from where the first backward left the blocks
        inputs = _inputs(plain, seed=step)
        out_a = plain(**inputs)[0]
        (out_a.square().mean()).backward()
        inputs_b = {k: (v.detach().clone().requires_grad_(True) if k == "hidden_states" else v)
                    for k, v in inputs.items()}
        out_b = swapped(**inputs_b)[0]
        (out_b.square().mean()).backward()
        assert torch.equal(out_a, out_b)
        assert torch.equal(inputs["hidden_states"].grad, inputs_b["hidden_states"].grad)
        assert torch.equal(plain.x_embedder.weight.grad, swapped.x_embedder.weight.grad)
    for s in swaps:
        assert s.peak_resident <= s.capacity, (s.name, s.peak_resident, s.capacity)


def test_inference_passes_equal_the_unswapped_model():
    plain, swapped = _models(False)
    swaps = enable_flux_block_swap(swapped, 4, "cpu")
    with torch.no_grad():
        for seed in range(3):
            inputs = _inputs(plain, seed)
            assert torch.equal(plain(**inputs)[0], swapped(**inputs)[0])
    assert all(s.peak_resident <= s.capacity for s in swaps)


def test_a_parked_block_cannot_compute():
    """The guard the other tests lean on: a parked block's weights are empty, so using it fails."""
    _, swapped = _models(False)
    swap = BlockSwap(swapped.single_transformer_blocks, 4, "cpu", "single blocks")
    parked = next(i for i in range(swap.n) if i not in swap.resident)
    swap.remove()  # without the hooks nothing brings it back
    block = swapped.single_transformer_blocks[parked]
    assert all(p.numel() == 0 for p in block.parameters())
    with pytest.raises(RuntimeError):
        block(torch.randn(1, 4, 64), torch.randn(1, 2, 64), torch.randn(1, 64))


def test_trained_parameters_are_never_moved():
    _, swapped = _models(False)
    lora_like = swapped.single_transformer_blocks[5].proj_out.weight
    lora_like.requires_grad_(True)
    before = lora_like.data_ptr()
    enable_flux_block_swap(swapped, 3, "cpu")
    assert lora_like.data_ptr() == before and lora_like.numel() > 0


@pytest.mark.parametrize("count,split", [(0, (0, 0)), (1, (0, 2)), (18, (9, 18)), (35, (17, 36))])
def test_split_as_sd_scripts(count, split):
    assert flux_block_split(count, 19, 38) == split  # FLUX.1's 19 double and 38 single blocks


def test_more_than_the_model_has_is_one_line():
    with pytest.raises(UserError, match="at most 35 can be swapped"):
        flux_block_split(36, 19, 38)
    with pytest.raises(UserError, match="at most 4 can be swapped"):
        flux_block_split(5, *BLOCKS)


# ------------------------------------------------------------------ flux_train_network.py --blocks_to_swap

@pytest.fixture(scope="module")
def deep_flux(tmp_path_factory):
    from tools.make_tiny_model import write_tiny_flux

    return write_tiny_flux("dev", tmp_path_factory.mktemp("deep_flux"), formats=("safetensors",), blocks=BLOCKS)


@pytest.mark.parametrize("extra", [[], ["--gradient_checkpointing"], ["--fp8_base", "--mixed_precision", "bf16"]])
def test_training_with_blocks_swapped_writes_the_same_lora(deep_flux, tmp_path, extra, caplog):
    import flux_train_network
    from tests.training.test_flux_train_network import run_args
    from tests.training.train_helpers import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", n=2)
    files = {}
    for swap in (None, "3"):
        out = tmp_path / f"out{swap}"
        swapping = ["--blocks_to_swap", swap] if swap else []
        flux_train_network.main(run_args(deep_flux, data, out, 2, *extra, *swapping))
        files[swap] = load_file(str(out / "lora.safetensors"))
    assert "block swap: 1 of 4 double blocks and 4 of 6 single blocks wait in CPU memory" in caplog.text
    assert files[None].keys() == files["3"].keys()
    for key, value in files[None].items():
        assert torch.equal(value, files["3"][key]), key
    moved = [k for k, v in files["3"].items() if k.endswith("lora_up.weight") and v.abs().sum() > 0]
    assert any(k.startswith("lora_unet_single_blocks_5_") for k in moved)  # a block that waited in CPU memory


def test_too_many_blocks_is_refused_before_loading(deep_flux, tmp_path):
    from tests.training.test_flux_train_network import _fails, run_args
    from tests.training.train_helpers import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", n=1)
    line = _fails(run_args(deep_flux, data, tmp_path / "o", 1, "--blocks_to_swap", "5"), tmp_path)
    assert "--blocks_to_swap 5" in line and "at most 4" in line
