"""Hashes of the base model / VAE files named in ``ss_*`` metadata, spec file-formats §b.2.

These identify the *input* files (A1111's old and new model hashes); the ``sshs_*`` hashes of the saved
LoRA itself live in ``library.formats.model_hashes``.
"""
from __future__ import annotations

import hashlib
import os

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_CHUNK = 1024 * 1024

# Upstream returns these strings instead of raising, so a missing file never stops a save (§b.2).
NO_FILE = "NOFILE"
IS_A_DIRECTORY = "IsADirectory"


def legacy_file_hash(path: str | os.PathLike) -> str:
    """Old A1111 hash: SHA-256 of the 0x10000 bytes at offset 0x100000, first 8 hex chars (§b.2)."""
    try:
        with open(path, "rb") as f:
            f.seek(_LEGACY_OFFSET)
            return hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]
    except FileNotFoundError:
        return NO_FILE
    except (IsADirectoryError, PermissionError):  # PermissionError is what Windows raises for a folder
        return IS_A_DIRECTORY


def sha256_file(path: str | os.PathLike) -> str:
    """New A1111 hash: SHA-256 hex of the whole file, read in 1 MiB chunks (§b.2)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return NO_FILE
    except (IsADirectoryError, PermissionError):
        return IS_A_DIRECTORY
    return digest.hexdigest()


def model_file_metadata(model: str | None, vae: str | None) -> dict[str, str]:
    """``ss_sd_model_*`` / ``ss_vae_*`` keys for ``--pretrained_model_name_or_path`` and ``--vae`` (§b.1).

    Hashes are written only when the path exists (a Diffusers folder gives ``IsADirectory``); the name is the
    basename of an existing path, else the id as given (a hub id).
    """
    out: dict[str, str] = {}
    for path, hash_key, new_hash_key, name_key in (
        (model, "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_sd_model_name"),
        (vae, "ss_vae_hash", "ss_new_vae_hash", "ss_vae_name"),
    ):
        if path is None:
            continue
        name = str(path)
        if os.path.exists(name):
            out[hash_key] = legacy_file_hash(name)
            out[new_hash_key] = sha256_file(name)
            name = os.path.basename(name)
        out[name_key] = name
    return out
