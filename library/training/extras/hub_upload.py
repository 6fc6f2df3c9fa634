"""Hugging Face Hub upload of saved files and ``--resume_from_huggingface`` (sd-scripts' huggingface_util).

``--huggingface_repo_id`` uploads every saved model file (step, epoch and final saves) to
``{--huggingface_path_in_repo}/{file name}`` of the repository, creating it first when it does not
exist (private unless ``--huggingface_repo_visibility public``). ``--save_state_to_huggingface`` also
uploads each saved state folder. ``--async_upload`` uploads in one background thread, in save order;
the final model is always uploaded synchronously (as sd-scripts), and the run waits for every pending
upload before it returns. A failed upload is one error line naming the file and the repository; the
local file is kept and training goes on. A local file is never pruned while its upload is pending.

``--resume_from_huggingface``: ``--resume`` is ``{repo_id}/{path_in_repo}:{revision}:{repo_type}``
(revision and repo type optional); the state folder is downloaded into the hub cache and resumed from.
The token (``--huggingface_token``) is only handed to ``HfApi`` / the download; it is never logged.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

from library.errors import UserError
from library.training.settings import HubSettings

logger = logging.getLogger(__name__)

try:  # module attributes, so tests replace them with fakes
    from huggingface_hub import HfApi, snapshot_download
except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers/transformers
    HfApi = snapshot_download = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class HubUploader:
    """Uploads saved files to one hub repository (main process only), synchronously or in one background thread."""

    def __init__(self, repo_id: str, repo_type: Optional[str] = None, path_in_repo: Optional[str] = None,
                 token: Optional[str] = None, private: bool = True, async_upload: bool = False):
        self.repo_id, self.repo_type, self.private, self.async_upload = repo_id, repo_type, private, async_upload
        self.path_in_repo = (path_in_repo or "").strip("/")
        self._token = token
        self._api = None
        self._repo_ready = False
        self._lock = threading.Lock()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: dict[str, Future] = {}
        self.failed: list[str] = []
        self.uploaded: list[str] = []

    @classmethod
    def from_settings(cls, hub: HubSettings) -> Optional["HubUploader"]:
        if not hub.repo_id:
            return None
        if HfApi is None:
            raise UserError("--huggingface_repo_id needs huggingface_hub: pip install huggingface_hub")
        return cls(hub.repo_id, hub.repo_type, hub.path_in_repo, hub.token, hub.private, hub.async_upload)

    def destination(self, src: str) -> str:
        name = os.path.basename(os.path.normpath(src))
        return f"{self.path_in_repo}/{name}" if self.path_in_repo else name

    def upload(self, src: str, sync: bool = False) -> None:
        """Upload a file or a folder to ``path_in_repo/<its name>``; in the background unless ``sync``."""
        src = os.path.abspath(src)
        if not self.async_upload:
            self._upload(src)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")
        future = self._executor.submit(self._upload, src)  # one queue: uploads stay in save order
        if sync:
            future.result()
        else:
            self._pending[src] = future
            logger.info("queued upload of %s to hub repo %s", os.path.basename(src), self.repo_id)

    def wait_for(self, path: str) -> None:
        """Block until a pending upload of ``path`` is done (before the file is pruned)."""
        future = self._pending.pop(os.path.abspath(path), None)
        if future is not None:
            future.result()

    def close(self) -> None:
        """Wait for every pending upload; then say how many failed."""
        if self._executor is not None:
            waiting = sum(not f.done() for f in self._pending.values())
            if waiting:
                logger.info("waiting for %d pending hub upload(s) to %s", waiting, self.repo_id)
            self._executor.shutdown(wait=True)
            self._executor = None
            self._pending.clear()
        if self.failed and self.async_upload:  # a summary after background failures scattered in the log
            logger.error("%d upload(s) to hub repo %s failed (kept locally): %s", len(self.failed), self.repo_id,
                         ", ".join(self.failed))

    # --- the work (may run in the background thread) -------------------------------------------------

    def _client(self):
        if self._api is None:
            self._api = HfApi(token=self._token)
        return self._api

    def _ensure_repo(self, api) -> None:
        if self._repo_ready:
            return
        if not api.repo_exists(self.repo_id, repo_type=self.repo_type):
            api.create_repo(self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True)
            logger.info("created %s hub repo %s", "private" if self.private else "public", self.repo_id)
        self._repo_ready = True

    def _upload(self, src: str) -> None:
        dest = self.destination(src)
        with self._lock:  # one upload at a time, whichever thread asks
            try:
                api = self._client()
                self._ensure_repo(api)
                if os.path.isdir(src):
                    api.upload_folder(repo_id=self.repo_id, repo_type=self.repo_type, folder_path=src,
                                      path_in_repo=dest)
                else:
                    api.upload_file(repo_id=self.repo_id, repo_type=self.repo_type, path_or_fileobj=src,
                                    path_in_repo=dest)
            except Exception as e:  # network, auth, quota: never fatal, the local file stays
                self.failed.append(os.path.basename(src))
                logger.error("hub upload of %s to %s:%s failed, the local copy is kept (%s)", src, self.repo_id,
                             dest, _first_line(e))
                return
            self.uploaded.append(dest)
            logger.info("uploaded %s to hub repo %s as %s", os.path.basename(src), self.repo_id, dest)


def parse_hub_location(location: str) -> tuple[str, str, Optional[str], Optional[str]]:
    """``{repo_id}/{path_in_repo}:{revision}:{repo_type}`` -> (repo_id, path_in_repo, revision, repo_type).

    As sd-scripts: with only a revision the repo type is ``model``; with neither both are None."""
    path, *rest = location.split(":")
    parts = [p for p in path.split("/") if p]
    if len(parts) < 2 or len(rest) > 2:
        raise UserError(f"--resume {location}: with --resume_from_huggingface it must be "
                        "'{repo_id}/{path_in_repo}:{revision}:{repo_type}' (revision and repo type optional)")
    revision = (rest[0] or None) if rest else None
    repo_type = (rest[1] or None) if len(rest) == 2 else ("model" if rest else None)
    return "/".join(parts[:2]), "/".join(parts[2:]), revision, repo_type


def download_state(location: str, token: Optional[str] = None) -> str:
    """``--resume_from_huggingface``: download the state folder named by ``--resume``; its local path."""
    repo_id, path_in_repo, revision, repo_type = parse_hub_location(location)
    if snapshot_download is None:  # pragma: no cover
        raise UserError("--resume_from_huggingface needs huggingface_hub: pip install huggingface_hub")
    logger.info("downloading state %s from hub repo %s (revision %s)", path_in_repo or "(whole repo)", repo_id,
                revision or "default")
    try:
        root = snapshot_download(repo_id=repo_id, repo_type=repo_type, revision=revision,
                                 allow_patterns=[f"{path_in_repo}/*"] if path_in_repo else None,
                                 token=token)
    except Exception as e:
        raise UserError(f"--resume_from_huggingface: cannot download {path_in_repo or 'the state'} from hub repo "
                        f"{repo_id} ({_first_line(e)})") from None
    folder = os.path.join(root, path_in_repo) if path_in_repo else root
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise UserError(f"--resume_from_huggingface: no files under {path_in_repo or '/'} in hub repo {repo_id}"
                        + (f" at revision {revision}" if revision else ""))
    return folder
