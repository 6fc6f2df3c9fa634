"""``--blocks_to_swap``: only some of a model's transformer blocks live on the device; the rest wait in CPU
memory and are copied in just before they run (forward, recomputation and backward) and dropped after.

The frozen weights of each swapped block are kept once in (pinned) CPU memory. A parked block's parameters
point at that copy (on the CPU itself: at an empty tensor, so a block used while parked fails loudly instead of
computing with the wrong data); bringing a block in copies it to the device on a side stream, and parking it
just drops the device copy: frozen weights never need copying back. Trained parameters (a LoRA's own) are
never touched.

Which block leaves is decided from the known order of use (Belady's rule: the block needed again furthest in
the future), not from a fixed pairing: a training step runs blocks 0..n-1 forward, then n-1..0 backward (also
when gradient checkpointing recomputes each block there), and an inference pass runs 0..n-1 again. So at most
``len(blocks) - to_swap`` blocks are resident, the next block is prefetched while the current one computes,
and a block whose backward may still be running (the one after the current, in backward order) is never
dropped. How many blocks of each kind FLUX.1 swaps follows sd-scripts (``flux_block_split``).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn

from library.errors import UserError

logger = logging.getLogger(__name__)


def flux_block_split(blocks_to_swap: int, num_double: int, num_single: int) -> tuple[int, int]:
    """(double blocks, single blocks) swapped for ``--blocks_to_swap``, as sd-scripts' ``enable_block_swap``:
    half the count (rounded down) of double blocks and twice the rest of single blocks, each at most the
    block count minus 2 (FLUX.1: at most 35)."""
    double = blocks_to_swap // 2
    single = (blocks_to_swap - double) * 2
    if double > num_double - 2 or single > num_single - 2:
        most = max(k for k in range(blocks_to_swap + 1)
                   if k // 2 <= num_double - 2 and (k - k // 2) * 2 <= num_single - 2)
        raise UserError(f"--blocks_to_swap {blocks_to_swap}: this model has {num_double} double and {num_single} "
                        f"single blocks, at most {most} can be swapped ({double} double and {single} single asked; "
                        "at least 2 of each kind stay on the device)")
    return double, single


class BlockSwap:
    """Keeps at most ``len(blocks) - to_swap`` of ``blocks`` on ``device``; see the module docstring."""

    def __init__(self, blocks: Sequence[nn.Module], to_swap: int, device: torch.device | str, name: str = "blocks"):
        self.n = len(blocks)
        self.capacity = self.n - to_swap
        if to_swap < 1 or self.capacity < 2:
            raise UserError(f"{name}: cannot swap {to_swap} of {self.n} blocks (at least 2 stay on the device)")
        self.device = torch.device(device)
        self.name = name
        self.cuda = self.device.type == "cuda"
        self.params = [[p for p in b.parameters() if not p.requires_grad] for b in blocks]
        # pinned: the copies to the GPU can run on the side stream while the GPU computes
        self.host = [[_host_copy(p.data, pin=self.cuda) for p in ps] for ps in self.params]
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.resident: set[int] = set()
        self.loading: dict[int, Optional[torch.cuda.Event]] = {}
        self.backward_follows = False
        self.phase = "forward"
        self.peak_resident = 0  # the most blocks ever on the device at once (tests and logs)
        for i, b in enumerate(blocks):
            for buf_owner in b.modules():  # buffers are small: always on the device
                for key, buf in buf_owner._buffers.items():
                    if buf is not None:
                        buf_owner._buffers[key] = buf.to(self.device)
            if i < self.capacity:
                self._load(i, sync=True)
            else:
                self._park(i)
        self.handles = [h for i, b in enumerate(blocks) for h in self._register(b, i)]

    # ---------------------------------------------------------------- hooks
    def _register(self, block: nn.Module, i: int) -> list:
        def pre(_module, _args):
            self.use(i)

        def post(_module, _args, output):
            if self.phase == "forward" and torch.is_grad_enabled():
                tensors = output if isinstance(output, (tuple, list)) else (output,)
                for t in tensors:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda grad: self._backward_reaches(i))
        return [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]

    def begin_pass(self) -> None:
        """Called as the whole model's forward starts: a backward follows when gradients are recorded."""
        self.phase = "forward"
        self.backward_follows = torch.is_grad_enabled()

    def _backward_reaches(self, i: int) -> None:
        self.phase = "backward"
        self.use(i)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    # ---------------------------------------------------------------- scheduling
    def use(self, i: int) -> None:
        """Block ``i`` is about to compute: make it resident, then prefetch the next one in order of use."""
        if i in self.loading:
            self._finish(i)
        elif i not in self.resident:
            self._make_room(i, keep={i})
            self._load(i, sync=True)
        nxt = i + 1 if self.phase == "forward" else i - 1
        if self.phase == "forward" and nxt == self.n:
            nxt = self.n - 1 if self.backward_follows else 0
        if 0 <= nxt < self.n and nxt not in self.resident and nxt not in self.loading:
            victim = self._victim(i, keep={i, nxt})
            if len(self.resident) + len(self.loading) < self.capacity or \
                    (victim is not None and self._distance(victim, i) > self._distance(nxt, i)):
                self._make_room(i, keep={i, nxt})
                self._load(nxt, sync=False)

    def _distance(self, j: int, i: int) -> int:
        """How many block uses from now (at block ``i``) until block ``j`` is used again."""
        n = self.n
        if self.phase == "backward":
            return i - j if j < i else i + 1 + j
        if j > i:
            return j - i
        return (n - 1 - i) + (n - j) if self.backward_follows else (n - i) + j

    def _victim(self, i: int, keep: set[int]) -> Optional[int]:
        protect = set(keep)
        if self.phase == "backward":
            protect.add(i + 1)  # its backward may still be running (nodes made earlier in its forward)
        candidates = [j for j in self.resident if j not in protect]
        return max(candidates, key=lambda j: self._distance(j, i)) if candidates else None

    def _make_room(self, i: int, keep: set[int]) -> None:
        while len(self.resident) + len(self.loading) >= self.capacity:
            victim = self._victim(i, keep)
            if victim is None:
                return  # everything resident is needed now: one block over, for a moment
            self._park(victim)

    # ---------------------------------------------------------------- moving weights
    def _load(self, i: int, sync: bool) -> None:
        if not self.cuda:
            to_cpu = self.device.type == "cpu"
            for p, h in zip(self.params[i], self.host[i]):
                p.data = h if to_cpu else h.to(self.device)
            self.resident.add(i)
            self._count()
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after the parked copy's last use
        with torch.cuda.stream(self.stream):
            for p, h in zip(self.params[i], self.host[i]):
                p.data = h.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.loading[i] = event
        if sync:
            self._finish(i)

    def _finish(self, i: int) -> None:
        event = self.loading.pop(i, None)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for p in self.params[i]:
                p.data.record_stream(current)  # the allocator keeps it until the compute stream is done with it
        self.resident.add(i)
        self._count()

    def _park(self, i: int) -> None:
        self.resident.discard(i)
        for p, h in zip(self.params[i], self.host[i]):
            p.data = torch.empty(0, dtype=h.dtype) if self.device.type == "cpu" else h

    def _count(self) -> None:
        self.peak_resident = max(self.peak_resident, len(self.resident) + len(self.loading))


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.to("cpu")
    return t.pin_memory() if pin else t


def move_except_blocks(model: nn.Module, block_lists: Sequence[nn.ModuleList], device: torch.device | str) -> None:
    """Every parameter and buffer of ``model`` to ``device`` except those inside ``block_lists``."""
    inside = {id(t) for blocks in block_lists for t in list(blocks.parameters()) + list(blocks.buffers())}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None and id(t) not in inside:
                    t.data = t.data.to(device)


def enable_flux_block_swap(transformer: nn.Module, blocks_to_swap: int, device: torch.device | str
                           ) -> tuple[BlockSwap, BlockSwap]:
    """Swap ``blocks_to_swap`` blocks of a diffusers ``FluxTransformer2DModel`` (sd-scripts' split between its
    double and single blocks); everything else goes to ``device``. Returns the two swappers."""
    double_list, single_list = transformer.transformer_blocks, transformer.single_transformer_blocks
    double, single = flux_block_split(blocks_to_swap, len(double_list), len(single_list))
    move_except_blocks(transformer, [double_list, single_list], device)
    swaps = []
    for blocks, count, name in ((double_list, double, "double blocks"), (single_list, single, "single blocks")):
        if count:
            swaps.append(BlockSwap(blocks, count, device, name))
        else:
            blocks.to(device)

    def begin_pass(_module, _args) -> None:
        for swap in swaps:
            swap.begin_pass()

    transformer.register_forward_pre_hook(begin_pass)
    logger.info("block swap: %d of %d double blocks and %d of %d single blocks wait in CPU memory", double,
                len(double_list), single, len(single_list))
    return tuple(swaps)
