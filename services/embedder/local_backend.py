"""The embedder's MLX model code run inside a client process: the public client's "local" backend.

``extmind.embedder_client`` imports this module only when it is importable (the services and
``mlx`` installed), so the client package itself never depends on ``services``. Models resolve
locally only (never downloads); the forwards run on one MLX thread of the client's process.
"""

from __future__ import annotations

import numpy as np

from services.common.mlx_thread import MLXThread
from services.embedder import recipe, registry
from services.embedder.engine import prepare

DEFAULT_MODEL = "all-minilm-l6-v2"
_CHUNK = 32  # texts per forward: bounds the padded batch without the service's batcher


class LocalEmbedder:
    """One loaded model at a time; loading another name replaces it (same MLX thread)."""

    def __init__(self):
        self._thread: MLXThread | None = None
        self._model = None
        self._key = ""

    @staticmethod
    def locate(spec: str) -> str:
        """The local directory ``spec`` resolves to; raises NotFound naming every place tried."""
        return str(registry.resolve(spec or DEFAULT_MODEL, download=False).path)

    def _load(self, spec: str):
        key = (spec or DEFAULT_MODEL).lower()
        if self._model is None or self._key != key:
            resolved = registry.resolve(spec or DEFAULT_MODEL, download=False)  # NotFound if absent
            if self._thread is None:
                self._thread = MLXThread("embedder-client-mlx")
            self._model = self._thread.call(registry.load, resolved)
            self._key = key
        return self._model

    def embed(
        self, spec: str, texts: list[str], input_type: str, instruction: str, dimensions: int
    ) -> tuple[np.ndarray, str, int, list[int]]:
        """-> (float32 [n, dims] L2-normalised vectors, model name, dims, tokens per text).

        Raises NotFound when the model is not available locally, InvalidArgument for a bad
        ``dimensions`` or an over-long text."""
        m = self._load(spec)
        dims = recipe.check_dimensions(int(dimensions), m.dimensions, m.min_dimensions, m.name)
        ids = prepare(m, texts, input_type, instruction, True)
        pooled = np.concatenate([self._thread.call(m.forward, ids[i : i + _CHUNK]) for i in range(0, len(ids), _CHUNK)])
        return recipe.finish(pooled, dims, True), m.name, dims, [len(s) for s in ids]

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False)
        self._thread, self._model, self._key = None, None, ""
