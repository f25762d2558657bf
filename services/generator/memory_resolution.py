"""Which memories a request attends to, checked against this generator's model, and their rows.

Both calls block on the memory service: run them off the MLX thread (the engine uses a worker
thread; the benchmark calls them directly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from extmind import errors, tensor
from extmind.v1 import memory_pb2
from services.generator.memory_client import MemoryChanged, MemoryClient, StoredRows


@dataclass(frozen=True)
class ModelShape:
    """What a memory must have been built with to be usable by this model."""

    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0  # token ids of a usable memory are below it (0 = not checked)
    dtype: int = 0  # the extmind.tensor dtype the model computes in (0 = unknown)
    # extmind.tensor dtype -> this model's fingerprint when computing in it (None = unknown): tells
    # a memory of this model built in another dtype from another model's.
    fingerprint_as: Callable[[int], str] | None = None

    def same_model(self, fingerprint: str, built: int) -> bool | None:
        """Whether a memory of another ``fingerprint`` built in dtype ``built`` is this model's
        (in another dtype); None when that cannot be told."""
        if self.fingerprint_as is None or not built or built == self.dtype:
            return None
        return self.fingerprint_as(built) == fingerprint


@dataclass
class ResolvedMemory:
    memory_id: str
    create_time: Timestamp  # as resolved: a memory deleted and created again gets a new one
    rows: int
    token_ids: list[int]  # per row (empty unless resolved with include_tokens)
    positions: list[int]  # per row: the token's position in the memorized text
    dtype: int = tensor.FLOAT32  # the rows' stored dtype (extmind.tensor code)

    @property
    def version(self) -> str:
        """``create_time`` as a string (bank cache keys, group keys)."""
        return f"{self.create_time.seconds}.{self.create_time.nanos}"


class MemoryResolver:
    def __init__(self, client: MemoryClient, model: ModelShape):
        self.client = client
        self.model = model

    def resolve(self, memory_ids, *, include_tokens: bool = False) -> list[ResolvedMemory]:
        """Looks every memory up and checks that it is READY and built by this model.

        Raises NotFound (no such memory), FailedPrecondition (another model, another layout,
        still building) or Unavailable (the memory service cannot be reached)."""
        m = self.model
        out = []
        for mid in memory_ids:
            mem = self.client.get_memory(mid, include_tokens=include_tokens)
            if mem.model_fingerprint != m.fingerprint:
                raise errors.FailedPrecondition(
                    f"memory {mid!r} was built by another model (fingerprint {mem.model_fingerprint[:19]}…, "
                    f"this generator is {m.fingerprint[:19]}…); "
                    + _rebuild_hint(mem.layout.dtype, m.dtype, m.same_model(mem.model_fingerprint, mem.layout.dtype))
                )
            lay = mem.layout
            if (lay.num_layers, lay.num_kv_heads, lay.head_dim) != (m.num_layers, m.num_kv_heads, m.head_dim):
                raise errors.FailedPrecondition(
                    f"memory {mid!r} has layout {lay.num_layers}x{lay.num_kv_heads}x"
                    f"{lay.head_dim}; this model needs {m.num_layers}x"
                    f"{m.num_kv_heads}x{m.head_dim}"
                )
            if mem.state != memory_pb2.MEMORY_STATE_READY:
                raise errors.FailedPrecondition(f"memory {mid!r} is still being built; retry when it is READY")
            if m.vocab_size and mem.token_ids and not 0 <= min(mem.token_ids) <= max(mem.token_ids) < m.vocab_size:
                raise errors.FailedPrecondition(
                    f"memory {mid!r} holds token ids outside this model's vocabulary (0-{m.vocab_size - 1}): "
                    "it was not memorized by this model's tokenizer; memorize the text again"
                )
            positions = list(mem.positions) or list(range(mem.num_tokens))
            out.append(
                ResolvedMemory(
                    mid, mem.create_time, int(mem.num_tokens), list(mem.token_ids), positions, dtype=lay.dtype
                )
            )
        return out

    def fetch(self, memory: ResolvedMemory, on_layer=None) -> StoredRows:
        """Every layer's keys and values of ``memory`` as stored, [KVH, rows, head_dim] in the
        memory's dtype (never widened: a half-precision memory moves and sits in half the bytes).
        ``on_layer(layer, keys, values, dtype)`` (optional) gets each layer as soon as its last
        slice has arrived (``MemoryClient.fetch_stored``).

        Raises MemoryChanged (FAILED_PRECONDITION) when the memory changed since it was resolved:
        deleted and created again (another create_time, even with as many rows), or other rows."""
        rows = self.client.fetch_stored(
            memory.memory_id, self.model.num_layers, memory.rows, on_layer=on_layer, create_time=memory.create_time
        )
        if rows.dtype != memory.dtype or any(k is None or k.shape[1] != memory.rows for k in rows.keys):
            raise MemoryChanged(f"memory {memory.memory_id!r} changed while it was fetched; send the request again")
        return rows


def dtype_note(built: int, computes: int, same_model: bool | None = None) -> str:
    """Why a memory of another fingerprint may be this model's: the dtype is part of the
    fingerprint (docs/platform.md, "Half precision on the CPU"), so one built in another dtype
    (e.g. float16, before ``--dtype auto`` widened the checkpoint) is named as such. same_model:
    whether it is this model's (``ModelShape.same_model``; None = cannot tell). -> "" when the
    dtypes agree or it is another model's."""
    if not built or not computes or built == computes or same_model is False:
        return ""
    was, now = (tensor.dtype_name(d).removeprefix("DTYPE_").lower() for d in (built, computes))
    if same_model:
        return (
            f"it is this model's memory, built in {was}, and this generator computes in {now}: "
            f"a generator started with --dtype {was} (GENERATOR_DTYPE) uses it"
        )
    return (
        f"it was built in {was} and this generator computes in {now}: if it is this model's memory, "
        f"a generator started with --dtype {was} (GENERATOR_DTYPE) uses it"
    )


def _rebuild_hint(built: int, computes: int, same_model: bool | None = None) -> str:
    """What to do about a memory of another fingerprint."""
    note = dtype_note(built, computes, same_model)
    return f"{note}; or memorize the text again" if note else "memorize the text with this model"
