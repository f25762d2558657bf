"""A Hugging Face hub id to a local checkpoint directory: the local cache first, then a download
unless downloads are off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``). The embedder's registry
and the generator both resolve hub ids here, so a hub id behaves the same for every service."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from services.common.config import TRUE_WORDS

# Seconds a hub request may wait for a connection or between reads. huggingface_hub's shared
# client has no timeout, so a hub that accepts and never answers held a service's start forever.
TIMEOUT_S = 30.0
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def offline() -> bool:
    """Whether downloads are off: ``HF_HUB_OFFLINE`` (as huggingface_hub reads it) or transformers'
    ``TRANSFORMERS_OFFLINE`` = 1 / true / yes / on."""
    return any(
        os.environ.get(name, "").strip().lower() in TRUE_WORDS for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the form of a hub id (``name`` or ``org/name``), not of a path such
    as ``./models/x``, ``~/x`` or ``a/b/c``, which the hub would only refuse."""
    return bool(_HUB_ID.fullmatch(spec)) and ".." not in spec


def snapshot(
    hub_id: str, allow_patterns: list[str], valid: Callable[[Path], bool], download: bool = True
) -> tuple[Path | None, list[str]]:
    """-> (the local snapshot of ``hub_id`` holding the files ``allow_patterns`` match, or None;
    one note per failed attempt, e.g. ``"hub org/model (download: the hub answered 404 (...))"``).
    Tries the local cache, then, unless ``download`` is False or ``offline()``, the hub, each
    request waiting at most TIMEOUT_S. A snapshot ``valid`` rejects (a partial copy) counts as not
    found. Never raises for a hub failure."""
    if not is_hub_id(hub_id):
        return None, [f"{hub_id!r} is not a hub id either (org/name)"]
    try:
        from huggingface_hub import get_session, snapshot_download
    except ImportError:
        return None, [f"hub {hub_id} (huggingface_hub is not installed)"]
    no_download = not download or offline()
    notes = []
    for local_only in (True,) if no_download else (True, False):
        try:
            if not local_only:
                _bound_timeouts(get_session())
            path = Path(snapshot_download(hub_id, local_files_only=local_only, allow_patterns=allow_patterns))
            if valid(path):
                return path, notes
            notes.append(f"hub {hub_id} ({'local cache' if local_only else 'download'}: not a model directory)")
        except Exception as exc:  # noqa: BLE001 - every hub failure just means "not here"
            notes.append(f"hub {hub_id} ({'local cache' if local_only else 'download'}: {_why(exc, local_only)})")
    if no_download:
        notes.append("(downloads are off: HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1, or a local-only lookup)")
    return None, notes


def _bounded(request) -> None:
    """An httpx request hook: a timeout left unset (None: wait forever) becomes TIMEOUT_S.
    huggingface_hub passes ``timeout=None`` to its API calls explicitly, which overrides a client's
    default, so the bound goes on each request instead."""
    given = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        k: TIMEOUT_S if given.get(k) is None else given[k] for k in ("connect", "read", "write", "pool")
    }


def _bound_timeouts(client) -> None:
    """Adds ``_bounded`` to huggingface_hub's shared client (once; a new client gets it again)."""
    hooks = client.event_hooks
    if _bounded not in hooks["request"]:
        hooks["request"].append(_bounded)
        client.event_hooks = hooks


def _line(exc: BaseException) -> str:
    """``exc`` as one short line: its type and its message's first line, cut at 160 characters."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _why(exc: Exception, local_only: bool) -> str:
    """One short line for a hub failure (its messages run to several lines of advice)."""
    if type(exc).__name__ == "LocalEntryNotFoundError":
        if local_only:
            return "not in the cache"
        # A download that failed falls back to the cache and raises this: say why it failed.
        exc = exc.__cause__ or exc.__context__ or exc
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return f"the hub answered {response.status_code} ({_line(exc)})"
    if "Timeout" in type(exc).__name__:
        return f"the hub did not answer within {TIMEOUT_S:g} s ({_line(exc)})"
    if any(n in type(exc).__name__ for n in ("Connect", "Network")):
        return f"the hub could not be reached ({_line(exc)})"
    return _line(exc)
