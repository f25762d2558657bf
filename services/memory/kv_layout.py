"""How a KV memory is laid out in Redis: key names, the meta hash <-> ``MemoryMeta``, ids.

Every key of one memory carries the hash tag ``{mem:<id>}``, so a memory lives in one Redis
Cluster slot; values are raw little-endian bytes:

    em:{mem:<id>}:meta              hash: layout, fingerprint, state, labels, counters:
                                    r:<layer> rows, c:<layer> chunks, bytes, full (layers complete),
                                    touch_us (last create/append, Redis's clock; see kv_reaper)
    em:{mem:<id>}:tokens            int32 token ids of the rows (may be absent)
    em:{mem:<id>}:positions         uint32 positions of the rows (may be absent)
    em:{mem:<id>}:chunks:<layer>    list of the layer's chunk names, in row order
    em:{mem:<id>}:k:<layer>:<name>  a chunk of the layer's keys,   [num_kv_heads, n, head_dim]
    em:{mem:<id>}:v:<layer>:<name>  a chunk of the layer's values, [num_kv_heads, n, head_dim]
    em:memories                     sorted set of memory ids (listing; repaired at start-up)

Chunk names are ``<stream>.<seq>`` (unique per append stream), so writers never overwrite each
other. How chunks are written and a memory turns READY is in ``kv_store``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field

from extmind.errors import InvalidArgument
from extmind.tensor import dtype_name

MEMORY_IDS_KEY = "em:memories"
ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # whole names: fullmatch (a "$" also matches before a final newline)
BUILDING, READY = "BUILDING", "READY"


def key_prefix(memory_id: str) -> str:
    """The prefix (with hash tag) of every key of one memory."""
    return f"em:{{mem:{memory_id}}}"


def meta_key(memory_id: str) -> str:
    return key_prefix(memory_id) + ":meta"


def tokens_key(memory_id: str) -> str:
    return key_prefix(memory_id) + ":tokens"


def positions_key(memory_id: str) -> str:
    return key_prefix(memory_id) + ":positions"


def chunk_key(memory_id: str, kind: str, layer: int, name) -> str:
    """``kind`` "k" (keys) or "v" (values)."""
    return f"{key_prefix(memory_id)}:{kind}:{layer}:{name}"


def chunk_list_key(memory_id: str, layer: int) -> str:
    return f"{key_prefix(memory_id)}:chunks:{layer}"


def check_id(memory_id: str, what: str = "memory_id") -> str:
    """``memory_id`` itself; InvalidArgument unless it is 1-128 of [A-Za-z0-9._:-]."""
    if not ID_RE.fullmatch(memory_id or ""):
        raise InvalidArgument(f"{what} {memory_id!r} is not valid: use 1-128 letters, digits, '-', '_', '.' or ':'")
    return memory_id


def new_memory_id() -> str:
    return "mem-" + uuid.uuid4().hex


def now_us() -> int:
    """Wall-clock microseconds since the epoch (create times)."""
    return time.time_ns() // 1000


@dataclass(frozen=True)
class Layout:
    """The shape of a memory's rows: per layer, keys and values [num_kv_heads, rows, head_dim]
    of ``dtype`` (an ``extmind.tensor`` dtype code)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: int

    def __str__(self) -> str:
        return (
            f"{self.num_layers} layers x {self.num_kv_heads} KV heads x head_dim {self.head_dim}, "
            f"{dtype_name(self.dtype)}"
        )


@dataclass
class MemoryMeta:
    """The meta hash of one memory."""

    memory_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: int
    fingerprint: str
    expected: int  # len(token_ids), or -1 when none were given
    state: str  # BUILDING or READY
    bytes: int  # keys + values stored
    labels: dict
    create_us: int
    touch_us: int = 0  # last create or append (Redis's clock, microseconds); 0 = not recorded
    rows: list = field(default_factory=list)  # per layer
    chunks: list = field(default_factory=list)  # per layer

    @property
    def layout(self) -> Layout:
        return Layout(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def num_tokens(self) -> int:
        if self.expected >= 0:
            return self.expected
        return min(self.rows) if self.rows else 0

    def creation_fields(self) -> list[str]:
        """The meta hash of a new (BUILDING, empty) memory, as a flat [field, value, ...] list."""
        fields = [
            "id",
            self.memory_id,
            "num_layers",
            self.num_layers,
            "num_kv_heads",
            self.num_kv_heads,
            "head_dim",
            self.head_dim,
            "dtype",
            self.dtype,
            "fingerprint",
            self.fingerprint,
            "expected",
            self.expected,
            "state",
            BUILDING,
            "bytes",
            0,
            "full",
            0,
            "labels",
            json.dumps(self.labels, sort_keys=True),
            "create_us",
            self.create_us,
        ]
        return [str(x) for x in fields]

    @staticmethod
    def from_hash(h: dict) -> MemoryMeta:
        """From the meta hash as redis-py returns it (bytes -> bytes)."""
        g = {k.decode(): v.decode() for k, v in h.items()}
        layers = int(g["num_layers"])
        return MemoryMeta(
            memory_id=g["id"],
            num_layers=layers,
            num_kv_heads=int(g["num_kv_heads"]),
            head_dim=int(g["head_dim"]),
            dtype=int(g["dtype"]),
            fingerprint=g["fingerprint"],
            expected=int(g["expected"]),
            state=g["state"],
            bytes=int(g.get("bytes", 0)),
            labels=json.loads(g.get("labels", "{}")),
            create_us=int(g["create_us"]),
            touch_us=int(g.get("touch_us", 0)),
            rows=[int(g.get(f"r:{i}", 0)) for i in range(layers)],
            chunks=[int(g.get(f"c:{i}", 0)) for i in range(layers)],
        )
