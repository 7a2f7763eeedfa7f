"""`--push-to-hub REPO`: an output folder (with its model card) uploaded to the Hugging Face Hub, for
users who are online. Checked before any work, so an offline machine, a malformed repo id or a
missing token is one line and nothing is written."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import LLMPruneError

_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
FIX_LATER = "run without --push-to-hub, and upload the folder later with `huggingface-cli upload REPO DIR`"


def check_hub(repo: str) -> None:
    """The hub can take a push to `repo` from here: a repo id, online, a token."""
    if not _REPO.fullmatch(repo):
        raise LLMPruneError(f"--push-to-hub '{repo}' is not a repo id", "pass one like your-name/pruned-gemma")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise LLMPruneError("--push-to-hub: this machine is offline (HF_HUB_OFFLINE is set)", FIX_LATER)
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        raise LLMPruneError(f"--push-to-hub: cannot reach {host} ({exc.strerror or exc})", FIX_LATER) from None
    from huggingface_hub import get_token

    if not get_token():
        raise LLMPruneError("--push-to-hub: no Hugging Face token", "run `huggingface-cli login` or set HF_TOKEN")


def push_folder(folder: str | os.PathLike, repo: str) -> str:
    """Upload `folder` to the model repo `repo` (created if needed); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as exc:  # the hub's errors are many; the output is safe on disk either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LLMPruneError(f"pushing '{Path(folder)}' to {repo} failed ({first[:200]}); the folder is complete",
                            f"upload it with `huggingface-cli upload {repo} {folder}`") from None
    return f"https://huggingface.co/{repo}"
