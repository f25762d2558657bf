"""A Hugging Face hub id to a local checkpoint directory: the local cache first, then a download
unless ``HF_HUB_OFFLINE`` is set. The embedder's registry and the generator both resolve hub ids
here, so a hub id behaves the same for every service."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def offline() -> bool:
    """Whether downloads are off (``HF_HUB_OFFLINE`` = 1 / true / yes)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def snapshot(
    hub_id: str, allow_patterns: list[str], valid: Callable[[Path], bool], download: bool = True
) -> tuple[Path | None, list[str]]:
    """-> (the local snapshot of ``hub_id`` holding the files ``allow_patterns`` match, or None;
    one note per failed attempt, e.g. ``"hub org/model (download: HfHubHTTPError: 404 ...)"``).
    Tries the local cache, then, unless ``download`` is False or ``offline()``, the hub. A snapshot
    ``valid`` rejects (a partial copy) counts as not found. Never raises for a hub failure."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None, [f"hub {hub_id} (huggingface_hub is not installed)"]
    no_download = not download or offline()
    notes = []
    for local_only in (True,) if no_download else (True, False):
        try:
            path = Path(snapshot_download(hub_id, local_files_only=local_only, allow_patterns=allow_patterns))
            if valid(path):
                return path, notes
            notes.append(f"hub {hub_id} ({'local cache' if local_only else 'download'}: not a model directory)")
        except Exception as exc:  # noqa: BLE001 - every hub failure just means "not here"
            notes.append(f"hub {hub_id} ({'local cache' if local_only else 'download'}: {_why(exc, local_only)})")
    if no_download:
        notes.append("(downloads are off: HF_HUB_OFFLINE=1 or local-only lookup)")
    return None, notes


def _why(exc: Exception, local_only: bool) -> str:
    """One short line for a hub failure (its messages run to several lines of advice)."""
    name = type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if name == "LocalEntryNotFoundError":
        # Raised by a download too when the hub cannot be reached (huggingface_hub then falls
        # back to the cache): say which.
        if local_only:
            return "not in the cache"
        return (
            f"the hub could not be reached ({type(cause).__name__}: {cause})"
            if cause
            else "the hub could not be reached"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {first[:160]}" if first else name
