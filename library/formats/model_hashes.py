"""``sshs_*`` hashes of a LoRA state dict, as sd-webui-additional-networks reads them (spec file-formats §b.2).

The hashes are taken from ``safetensors.torch.save(tensors, only ss_* metadata)``: the model hash is
the SHA-256 of the tensor data region, which equals the data region of the file finally written
(metadata does not change the data layout). Callers must pass the tensors *after* any cast to the
save dtype, otherwise the hash describes a file that was never written (pitfall 10).
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from safetensors.torch import save

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def data_region_sha256(buffer: bytes) -> str:
    """SHA-256 hex of a serialized safetensors buffer after its 8-byte length and JSON header."""
    header_len = int.from_bytes(buffer[:8], "little")
    return hashlib.sha256(memoryview(buffer)[8 + header_len:]).hexdigest()


def legacy_hash(buffer: bytes) -> str:
    """First 8 hex chars of SHA-256 over 0x10000 bytes at offset 0x100000 (empty when the file is shorter)."""
    return hashlib.sha256(memoryview(buffer)[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]


def precalculate_safetensors_hashes(state_dict: Mapping[str, torch.Tensor],
                                    metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of ``state_dict`` serialized with its ``ss_*`` metadata only."""
    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    # an empty dict (not None) as sd-scripts passes it: the header, hence the legacy hash, depends on it
    buffer = save(dict(state_dict), ss_only)
    return data_region_sha256(buffer), legacy_hash(buffer)
