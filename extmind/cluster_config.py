"""The local cluster's configuration: the environment variables the launcher reads
(``ENV_VARS``), the ``Settings`` built from them, the run dir's ``cluster.json`` record that tells
clients in other shells where the cluster is, and the command line of each service (with the
generator's default model). Nothing here starts or stops a process; ``extmind.cluster`` does.
See docs/configuration.md for the variables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from extmind.envvars import service_variables

REPO = Path(__file__).resolve().parent.parent

# name -> (default, meaning). The README's configuration table is generated from the same facts.
ENV_VARS = {
    "EMBEDDER_PORT": ("50051", "embedder gRPC port"),
    "EMBEDDER_HTTP_PORT": ("8000", "embedder HTTP face (/embed, /v1/embeddings, /health)"),
    "MEMORY_PORT": ("50052", "memory gRPC port"),
    "MEMORY_HTTP_PORT": ("8002", "memory HTTP port (/metrics, /health); -1 = off"),
    "GENERATOR_PORT": ("50053", "generator gRPC port"),
    "GENERATOR_HTTP_PORT": ("8001", "generator OpenAI-compatible HTTP face (/v1/chat/completions, /v1/memories, ...)"),
    "EMBEDDER_MODEL": ("", "embedder model aliases or paths, comma-separated (empty = offline all-MiniLM-L6-v2)"),
    "EMBEDDER_RERANKER": ("", "reranker model alias or path (empty = no reranker)"),
    "GENERATOR_MODEL": ("", "generator model path or hub id (empty = the committed models/extmind-facts-6m)"),
    "REDIS_URL": ("", "Redis for the memory service (empty = memory starts its own with AOF)"),
    "MEMORY_DATA_DIR": ("<run dir>/data/memory", "memory service data dir (its embedded Redis' AOF)"),
    "EXTMIND_MODEL_CACHE": ("<run dir>/models", "where the launcher builds the default generator model"),
    "EMBEDDER_URL": ("127.0.0.1:$EMBEDDER_PORT", "where clients and the memory service reach the embedder"),
    "MEMORY_URL": ("127.0.0.1:$MEMORY_PORT", "where clients and the generator reach the memory service"),
    "GENERATOR_URL": ("127.0.0.1:$GENERATOR_PORT", "where clients reach the generator"),
    "EXTMIND_START_TIMEOUT": ("600", "seconds `up` waits for every service to say SERVING"),
    "EXTMIND_STOP_GRACE": ("15", "seconds `down` waits after SIGTERM before SIGKILL"),
    "EXTMIND_RUN_DIR": (".run", "run directory (logs/, pids/, data/, models/, cluster.json)"),
}

ORDER = ("embedder", "memory", "generator")  # start order; stopped in reverse
RECORD = "cluster.json"  # what `up` started, for clients in other shells
# The offline default: a 5.8M-parameter Llama trained (training/train.py) to answer questions about
# fictional people from facts in its prompt or its extended mind; see its README.md.
FACTS_MODEL = REPO / "models" / "extmind-facts-6m"
FACTS_MODEL_NOTICE = (
    "NOTE: GENERATOR_MODEL is not set, so the generator serves models/extmind-facts-6m, a tiny Llama\n"
    "      trained only to answer 'Question: ...?\\nAnswer:' about facts of fictional people that it\n"
    '      has in its prompt or in its memory (names made of its training syllables: README, "Your own\n'
    '      facts"); other prompts give meaningless text. Set GENERATOR_MODEL to a model directory or\n'
    "      hub id for general text."
)
RANDOM_MODEL_NOTICE = (
    "NOTE: GENERATOR_MODEL is not set, so the generator serves a tiny RANDOM-WEIGHT Llama built locally.\n"
    "      Its text is meaningless; memorize, retrieval and citations still run for real.\n"
    "      Set GENERATOR_MODEL to a model directory or hub id for real text."
)

# The same in one line each (the demo's header).
FACTS_MODEL_LINE = (
    "model: the offline default, trained for 'Question: ...?\\nAnswer:' on facts in its prompt or memory; "
    "other prompts: meaningless text"
)
RANDOM_MODEL_LINE = "model: a tiny RANDOM-WEIGHT Llama (meaningless text; GENERATOR_MODEL for real text)"


class LaunchError(RuntimeError):
    """A readable, one-paragraph reason why the cluster could not start."""


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _port(name: str) -> int:
    raw = _env(name) or ENV_VARS[name][0]
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not a port number") from None


def probe_host(prefix: str) -> str:
    host = _env(f"{prefix}_HOST")
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    port: int
    probe: str  # host:port the health check asks
    extra: dict = field(default_factory=dict)  # shown in status (e.g. the HTTP port)


@dataclass
class Settings:
    run_dir: Path
    embedder_port: int
    embedder_http_port: int
    memory_port: int
    memory_http_port: int
    generator_port: int
    generator_http_port: int
    embedder_model: str
    embedder_reranker: str
    generator_model: str
    redis_url: str
    memory_data_dir: Path
    model_cache: Path
    embedder_url: str
    memory_url: str
    generator_url: str
    start_timeout: float
    stop_grace: float

    @classmethod
    def from_env(cls, run_dir: str | os.PathLike | None = None, *, use_record: bool = False) -> Settings:
        """Settings from the environment. ``use_record=True`` (clients, ``status``): URLs, Redis and
        data dir not set explicitly come from the run dir's ``cluster.json`` before the defaults."""
        run = Path(run_dir or _env("EXTMIND_RUN_DIR") or ".run").resolve()
        rec = read_record(run) if use_record else {}
        ep, hp, mp, gp = (_port(n) for n in ("EMBEDDER_PORT", "EMBEDDER_HTTP_PORT", "MEMORY_PORT", "GENERATOR_PORT"))
        data_dir = _env("MEMORY_DATA_DIR") or rec.get("memory_data_dir") or run / "data" / "memory"
        return cls(
            run_dir=run,
            embedder_port=ep,
            embedder_http_port=hp,
            memory_port=mp,
            memory_http_port=_port("MEMORY_HTTP_PORT"),
            generator_port=gp,
            generator_http_port=_port("GENERATOR_HTTP_PORT"),
            embedder_model=_env("EMBEDDER_MODEL"),
            embedder_reranker=_env("EMBEDDER_RERANKER"),
            generator_model=_env("GENERATOR_MODEL"),
            redis_url=_env("REDIS_URL") or rec.get("redis_url", ""),
            memory_data_dir=Path(data_dir),
            model_cache=Path(_env("EXTMIND_MODEL_CACHE") or run / "models"),
            embedder_url=_env("EMBEDDER_URL") or rec.get("embedder_url") or f"127.0.0.1:{ep}",
            memory_url=_env("MEMORY_URL") or rec.get("memory_url") or f"127.0.0.1:{mp}",
            generator_url=_env("GENERATOR_URL") or rec.get("generator_url") or f"127.0.0.1:{gp}",
            start_timeout=float(_env("EXTMIND_START_TIMEOUT") or 600),
            stop_grace=float(_env("EXTMIND_STOP_GRACE") or 15),
        )

    @property
    def record_file(self) -> Path:
        return self.run_dir / RECORD

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.run_dir / "pids"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.pids / f"{name}.pid"


def read_record(run_dir: Path) -> dict:
    """The run dir's ``cluster.json`` (written by ``up``), or {} when there is none or it is unreadable."""
    try:
        data = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find_run_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The run dir a client means: ``explicit``, else $EXTMIND_RUN_DIR, else ``./.run``, else the
    checkout's ``.run`` when only that one holds a cluster record (the CLI run from elsewhere)."""
    if explicit or _env("EXTMIND_RUN_DIR"):
        return Path(explicit or _env("EXTMIND_RUN_DIR")).resolve()
    here = Path(".run").resolve()
    if not (here / RECORD).exists() and (REPO / ".run" / RECORD).exists():
        return REPO / ".run"
    return here


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``name`` in a recorded command line, None when it was not passed."""
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def url_given(name: str) -> str:
    """``<NAME>_URL`` from the environment (a service run elsewhere), "" when unset."""
    return _env(f"{name.upper()}_URL")


def as_started(s: Settings, memory_argv: list[str] | None) -> Settings:
    """``s`` with the Redis URL and data dir of a memory service started with ``memory_argv`` (its
    pid record's command line; None: none recorded, ``s`` as it is): where its Redis runs, whatever
    the environment says now."""
    if not memory_argv:
        return s
    data_dir = _flag(memory_argv, "--data-dir")
    return dataclasses.replace(
        s,
        redis_url=_flag(memory_argv, "--redis-url") or "",
        memory_data_dir=Path(data_dir) if data_dir else s.memory_data_dir,
    )


def addresses(s: Settings, recs: dict) -> dict:
    """The cluster's addresses as ``up`` left it: the gRPC URLs and the HTTP ports of the services
    ``recs`` (name -> a pid record with ``.port``, ``.argv`` and ``.extra``) started or found
    running, and the memory service's Redis and data dir. A service already running keeps what it
    was started with, whatever the environment asks now (``up`` warns that those settings wait for
    a ``make down``)."""

    def url(name: str) -> str:
        if url_given(name):
            return url_given(name)
        port = recs[name].port if name in recs else getattr(s, f"{name}_port")
        return f"127.0.0.1:{port}"

    def http(name: str) -> int:
        rec = recs.get(name)  # a record without one: started with its HTTP face off
        return int(rec.extra.get("http", -1)) if rec is not None else getattr(s, f"{name}_http_port")

    def http_url(name: str) -> str:  # "" when off (-1) or on a port the service picked (0)
        return f"http://127.0.0.1:{http(name)}" if http(name) > 0 else ""

    memory = as_started(s, recs["memory"].argv if "memory" in recs else None)
    return {
        "embedder_url": url("embedder"),
        "memory_url": url("memory"),
        "generator_url": url("generator"),
        "embedder_http_port": http("embedder"),  # -1: off, 0: a port the service picked
        "generator_http_port": http("generator"),
        "memory_http_port": http("memory"),
        "embedder_http_url": http_url("embedder"),
        "generator_http_url": http_url("generator"),
        "redis_url": memory.redis_url,
        "memory_data_dir": str(memory.memory_data_dir),
    }


def write_record(s: Settings, recs: dict) -> None:
    """Writes the run dir's ``cluster.json`` (atomically): ``addresses`` of the services ``recs``."""
    a = addresses(s, recs)
    keys = ("embedder_url", "memory_url", "generator_url", "embedder_http_url", "generator_http_url")
    data = {k: a[k] for k in (*keys, "redis_url", "memory_data_dir")}
    data["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = s.record_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, s.record_file)


# ------------------------------------------------------------------ the generator's default model


def default_generator_model(cache: Path, announce=print) -> Path:
    """A small random-weight Llama (HF layout + tokenizer), built once and cached under ``cache``."""
    path = cache / "tiny-llama-random"
    if (path / "config.json").exists():
        return path
    from extmind.tiny_models import build_llama  # the same builder the tests use

    announce(f"building the default generator model (tiny random-weight Llama) in {path} ...")
    tmp = cache / f".tiny-llama-random.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # ~0.8M parameters (3 MB): big enough for real multi-layer, multi-head retrieval, quick to load.
    build_llama(tmp, hidden=128, layers=4, heads=4, kv_heads=2, seed=0)
    os.replace(tmp, path)  # never leave a half-written model where the generator would load it
    return path


def generator_model(s: Settings, announce=print) -> str:
    if s.generator_model:
        return s.generator_model
    if (FACTS_MODEL / "model.safetensors").exists():
        announce(FACTS_MODEL_NOTICE)
        return str(FACTS_MODEL)
    announce(RANDOM_MODEL_NOTICE)
    return str(default_generator_model(s.model_cache, announce))


# ------------------------------------------------------------------ command lines


def service_specs(s: Settings, announce=print, names=ORDER) -> dict[str, ServiceSpec]:
    py = [sys.executable, "-m"]
    specs: dict[str, ServiceSpec] = {}
    if "embedder" in names:
        argv = py + ["services.embedder", "--port", str(s.embedder_port), "--http-port", str(s.embedder_http_port)]
        for m in filter(None, (x.strip() for x in s.embedder_model.split(","))):
            argv += ["--model", m]
        for m in filter(None, (x.strip() for x in s.embedder_reranker.split(","))):
            argv += ["--reranker", m]
        specs["embedder"] = ServiceSpec(
            "embedder",
            argv,
            s.embedder_port,
            f"{probe_host('EMBEDDER')}:{s.embedder_port}",
            {"http": s.embedder_http_port},
        )
    if "memory" in names:
        argv = py + [
            "services.memory",
            "--port",
            str(s.memory_port),
            "--embedder-url",
            s.embedder_url,
            "--data-dir",
            str(s.memory_data_dir),
        ]
        if s.redis_url:
            argv += ["--redis-url", s.redis_url]
        argv += ["--http-port", str(s.memory_http_port)]
        extra = {"http": s.memory_http_port} if s.memory_http_port >= 0 else {}
        specs["memory"] = ServiceSpec(
            "memory",
            argv,
            s.memory_port,
            f"{probe_host('MEMORY')}:{s.memory_port}",
            extra | {"redis": s.redis_url or "embedded"},
        )
    if "generator" in names:
        argv = py + [
            "services.generator",
            "--model",
            generator_model(s, announce),
            "--memory-url",
            s.memory_url,
            "--port",
            str(s.generator_port),
            "--http-port",
            str(s.generator_http_port),
        ]
        specs["generator"] = ServiceSpec(
            "generator",
            argv,
            s.generator_port,
            f"{probe_host('GENERATOR')}:{s.generator_port}",
            {"http": s.generator_http_port},
        )
    return specs


def env_digests(name: str, env: dict[str, str], argv: list[str]) -> dict[str, str]:
    """Service ``name``'s flag variables set in ``env`` (``extmind.envvars.service_variables``)
    whose flag its command line ``argv`` does not give (a flag wins over its variable) -> a short
    digest of each value: enough to tell that a setting changed, without writing a token or a
    password into the pid file."""
    return {
        var: hashlib.sha256(env[var].encode()).hexdigest()[:16]
        for var, flag in service_variables(name).items()
        if env.get(var) is not None and flag not in argv
    }


def child_env(run_dir: Path | None = None) -> dict[str, str]:
    """The services' environment: this one, the repo on PYTHONPATH, and defaults for a local run.
    With ``run_dir`` (``up``), on MLX CUDA their compiled kernels stay under ``run_dir/mlx-kernels``
    (a folder per service and MLX build: services/common/mlx_kernel_cache.py), so a later ``up``
    skips compiling them again (docs/platform.md, "CUDA notes"); ``EXTMIND_MLX_KERNEL_CACHE`` set
    (even empty) wins. Without (``exec``, a container's entry point, whose working folder may not be
    writable): MLX's own folder unless the variable is set."""
    env = dict(os.environ)
    if run_dir is not None:
        env.setdefault("EXTMIND_MLX_KERNEL_CACHE", str(run_dir / "mlx-kernels"))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    env.setdefault("EXTMIND_LOG_FORMAT", "text")  # people read .run/logs; containers may set json
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
