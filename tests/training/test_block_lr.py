"""--block_lr: every U-Net parameter lands in the block sd-scripts' sdxl_train.py puts it in.

Oracle: the block map below, written out by hand from sd-scripts v0.8.7's ``get_block_params_to_optimize``
(0 = time_embed/label_emb, 1-9 = input_blocks.0-8, 10-12 = middle_block.0-2, 13-21 = output_blocks.0-8,
22 = out) and the SDXL layout (which diffusers module is which LDM block), checked on the real-size SDXL
U-Net built on the meta device (real parameter names, no memory).
"""
import pytest
import torch

from library.errors import UserError
from library.models.real_size import SDXL_UNET
from library.training.optim.block_lr import block_param_groups, parse_block_lr

# diffusers module prefix -> sd-scripts block number, by hand
HAND_MAP = {
    "time_embedding": 0, "add_embedding": 0,
    "conv_in": 1,  # input_blocks.0
    "down_blocks.0.resnets.0": 2, "down_blocks.0.resnets.1": 3, "down_blocks.0.downsamplers.0": 4,
    "down_blocks.1.resnets.0": 5, "down_blocks.1.attentions.0": 5,
    "down_blocks.1.resnets.1": 6, "down_blocks.1.attentions.1": 6, "down_blocks.1.downsamplers.0": 7,
    "down_blocks.2.resnets.0": 8, "down_blocks.2.attentions.0": 8,
    "down_blocks.2.resnets.1": 9, "down_blocks.2.attentions.1": 9,
    "mid_block.resnets.0": 10, "mid_block.attentions.0": 11, "mid_block.resnets.1": 12,
    "up_blocks.0.resnets.0": 13, "up_blocks.0.attentions.0": 13,
    "up_blocks.0.resnets.1": 14, "up_blocks.0.attentions.1": 14,
    "up_blocks.0.resnets.2": 15, "up_blocks.0.attentions.2": 15, "up_blocks.0.upsamplers.0": 15,
    "up_blocks.1.resnets.0": 16, "up_blocks.1.attentions.0": 16,
    "up_blocks.1.resnets.1": 17, "up_blocks.1.attentions.1": 17,
    "up_blocks.1.resnets.2": 18, "up_blocks.1.attentions.2": 18, "up_blocks.1.upsamplers.0": 18,
    "up_blocks.2.resnets.0": 19, "up_blocks.2.resnets.1": 20, "up_blocks.2.resnets.2": 21,
    "conv_norm_out": 22, "conv_out": 22,  # out.0, out.2
}


def _hand_block(name: str) -> int:
    heads = [h for h in HAND_MAP if name.startswith(h + ".")]
    assert len(heads) == 1, (name, heads)
    return HAND_MAP[heads[0]]


@pytest.fixture(scope="module")
def sdxl_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET)


def test_every_parameter_in_its_hand_mapped_block(sdxl_unet):
    lrs = [(i + 1) * 1e-6 for i in range(23)]  # distinct: the rate names the block
    groups, names = block_param_groups(sdxl_unet, lrs)
    assert names == [f"lr/block{i}" for i in range(23)]
    got = {id(p): round(g["lr"] / 1e-6) - 1 for g in groups for p in g["params"]}
    params = list(sdxl_unet.named_parameters())
    assert len(got) == len(params) == sum(len(g["params"]) for g in groups)  # each parameter exactly once
    for name, p in params:
        assert got[id(p)] == _hand_block(name), name


def test_zero_rate_leaves_the_block_out(sdxl_unet):
    lrs = [1e-5] * 23
    lrs[0] = lrs[11] = lrs[22] = 0
    groups, names = block_param_groups(sdxl_unet, lrs)
    assert "lr/block11" not in names and len(groups) == len(names) == 20
    kept = {id(p) for g in groups for p in g["params"]}
    for name, p in sdxl_unet.named_parameters():
        assert (id(p) in kept) == (_hand_block(name) not in (0, 11, 22)), name


@pytest.mark.parametrize("text,msg", [
    (",".join(["1e-6"] * 22), "must have 23"),
    (",".join(["1e-6"] * 22 + ["x"]), "'x' is not a number"),
    (",".join(["1e-6"] * 22 + ["-1"]), "cannot be negative"),
])
def test_bad_block_lr_is_one_line(text, msg):
    with pytest.raises(UserError, match=msg):
        parse_block_lr(text)


def test_block_lr_parses_23_values():
    assert parse_block_lr(None) is None
    assert parse_block_lr(" 1e-6, " * 22 + "0") == [1e-6] * 22 + [0.0]
