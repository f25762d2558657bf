"""Every default and limit of the memory service, defined once.

The engines validate against these; the app uses them as flag defaults. Sizes are bytes unless
the name says otherwise.
"""

from __future__ import annotations

# ---------------------------------------------------------------- searches
MAX_TOP_K = 1024  # largest top_k of SearchMemory and SearchDocuments (--max-top-k)
DEFAULT_DOCUMENT_TOP_K = 10  # SearchDocuments with top_k 0
SEARCH_THREADS = 2  # FAISS searches and index builds (--search-threads)
# A memory loading into RAM pauses its index build for at most this long while FetchMemory streams
# send its rows (the generator that memorized it waits for them; a 128 MiB fetch takes < 1 s).
FETCH_YIELD_SECONDS = 5.0
ANSWER_ENVELOPE_BYTES = 4096  # room left in a message for everything but the tensors

# ---------------------------------------------------------------- KV memory layouts
MAX_LAYOUT = {"num_layers": 1024, "num_kv_heads": 256, "head_dim": 1024}
MAX_FINGERPRINT_CHARS = 256
MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 256
MAX_LABEL_VALUE_CHARS = 4096

# ---------------------------------------------------------------- ListMemories
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# ---------------------------------------------------------------- moving rows
# FetchMemory: keys + values of one message stay under 4 MiB (room left for the envelope).
FETCH_CHUNK_BYTES = 4 * 1024 * 1024 - ANSWER_ENVELOPE_BYTES
# AppendMemory: rows are stored in chunks of at most this many bytes per tensor, and sent to
# Redis in batches of about FLUSH_BYTES (one batch in flight while the next arrives).
STORAGE_CHUNK_BYTES = 8 * 1024 * 1024
FLUSH_BYTES = 16 * 1024 * 1024
# An append stream into an empty memory keeps the rows it stored (up to this many bytes of keys +
# values): the memory, once READY, loads into RAM from them instead of reading Redis back.
KEEP_APPENDED_BYTES = 1024 * 1024 * 1024
# A BUILDING memory untouched by CreateMemory or an append this long is abandoned and deleted
# (--building-ttl; kv_reaper). Long enough for a generator's pause between windows of a Memorize.
BUILDING_TTL_SECONDS = 600.0

# ---------------------------------------------------------------- documents
MAX_DOCUMENT_ID_CHARS = 512
MAX_DIMENSIONS = 65536

# ---------------------------------------------------------------- the embedder service
EMBEDDER_TIMEOUT_SECONDS = 60.0  # --embedder-timeout

# Texts per Embed call from the documents path: 64 vectors of even 4096 float32 dimensions are
# 1 MiB, inside the embedder's default 4 MiB response budget and its 512-input limit.
EMBED_BATCH_TEXTS = 64
