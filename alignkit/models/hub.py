"""Is the Hugging Face hub reachable? Asked once, so a hub id with no network fails in seconds, not after
a minute of retries, and a model or dataset already in the local Hugging Face cache still loads offline."""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub endpoint does not accept a connection within a few seconds;
    then the hub libraries are switched to offline mode (local cache only) for this process."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=CONNECT_TIMEOUT_S).close()
        except OSError:
            offline = True
    if offline:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            import datasets.config

            datasets.config.HF_HUB_OFFLINE = True
        except ImportError:
            pass
    return offline


def offline_hint(name: str) -> str:
    """The end of a one-line error about a hub id that could not be loaded."""
    if not hub_offline():
        return ""
    return (f" (the Hugging Face hub is not reachable from here, or HF_HUB_OFFLINE is set, and {name} is not in "
            f"the local Hugging Face cache: download it where the hub is reachable, or give a local path)")
