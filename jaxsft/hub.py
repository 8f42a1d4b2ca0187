"""Whether the Hugging Face hub can be reached, asked once and quickly (huggingface_hub itself retries for ~30 s
before it gives up, then prints a long traceback)."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str, timeout: float) -> str | None:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return None
    except OSError as e:
        return str(e) or type(e).__name__


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """None when a TCP connection to the hub endpoint (HF_ENDPOINT) opens, else why it did not."""
    return _probe(hub_endpoint(), timeout)


def cached_snapshot(repo_id: str, patterns: list[str] | None = None) -> str | None:
    """The local cache's copy of a hub model, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
