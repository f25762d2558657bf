"""The environment-variable registry (extmind/envvars.py) is complete, and the documentation
tables are exactly the registry."""

from __future__ import annotations

import re
from pathlib import Path

from extmind import envvars

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("extmind", "services", "bench")
SERVICE_PREFIXES = ("EMBEDDER", "MEMORY", "GENERATOR")

NAME = r"""["']([A-Z_][A-Z0-9_]*)["']"""
LITERAL_READS = [
    re.compile(p)
    for p in (
        r"os\.environ\.(?:get|setdefault|pop)\(\s*" + NAME,
        r"os\.getenv\(\s*" + NAME,
        r"os\.environ\[\s*" + NAME + r"\s*\]",
        r"\benv\s*=\s*" + NAME,  # FlagParser.flag(..., env="X") fallbacks
        r"\b_env\(\s*" + NAME,  # the cluster launcher's reader
        r"\b_threads_env\(\s*" + NAME,  # the memory service's thread counts (kv_search.py)
    )
]
# env=f"{prefix}_HOST" (the shared server flags) and _env(f"{prefix}_HOST"): one per service.
PREFIXED_READS = re.compile(r"""(?:\benv\s*=\s*|\b_env\(\s*)f["']\{\w+\}(_[A-Z0-9_]+)["']""")
# Reads whose name is not a literal; each is accounted for below (MODELS, ENV_VARS, flag tables).
INDIRECT_READ = re.compile(r"""os\.(?:environ\.get\(|getenv\(|environ\[)\s*([^\s"'][^,)\]]*)""")
KNOWN_INDIRECT = {"name", "env", "a.path_env"}


def _sources():
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            if path.is_relative_to(REPO / "extmind" / "v1"):
                continue  # generated protobuf code
            yield path


def _reads() -> dict[str, list[str]]:
    """variable name -> ["file:line", ...] for every read found in the scanned sources."""
    found: dict[str, list[str]] = {}
    for path in _sources():
        rel = path.relative_to(REPO)
        for no, line in enumerate(path.read_text().splitlines(), 1):
            names = [m.group(1) for rx in LITERAL_READS for m in rx.finditer(line)]
            names += [p + m.group(1) for m in PREFIXED_READS.finditer(line) for p in SERVICE_PREFIXES]
            for n in names:
                found.setdefault(n, []).append(f"{rel}:{no}")
    return found


def test_scan_finds_the_reads_it_is_meant_to_find():
    reads = _reads()
    # one of each kind of read, so a broken pattern cannot pass silently
    for name in (
        "EXTMIND_FAISS_THREADS",
        "EXTMIND_CLI_TIMEOUT",
        "EXTMIND_TLS_CA",
        "GENERATOR_WINDOW",
        "MEMORY_HOST",
        "EXTMIND_RUN_DIR",
    ):
        assert name in reads, f"the scan no longer sees {name}: update the patterns in this test"


def test_every_variable_read_is_registered():
    missing = {n: where for n, where in _reads().items() if n not in envvars.BY_NAME}
    assert not missing, "variables read but missing from extmind/envvars.py REGISTRY: " + "; ".join(
        f"{n} ({', '.join(w)})" for n, w in sorted(missing.items())
    )


def test_indirect_reads_are_accounted_for():
    odd = []
    for path in _sources():
        for no, line in enumerate(path.read_text().splitlines(), 1):
            for m in INDIRECT_READ.finditer(line):
                if m.group(1) not in KNOWN_INDIRECT:
                    odd.append(f"{path.relative_to(REPO)}:{no}: {m.group(0)}")
    assert not odd, (
        "environment reads through an expression this test cannot follow; register the "
        "variables and teach test_envvars.py where the names come from:\n" + "\n".join(odd)
    )


def test_model_alias_variables_are_registered():
    from extmind.embedding_models import MODELS

    alias_vars = {m.path_env for m in MODELS if m.path_env}
    assert alias_vars, "no alias variables found"
    assert alias_vars <= set(envvars.BY_NAME), sorted(alias_vars - set(envvars.BY_NAME))


def test_cluster_launcher_variables_are_registered():
    from extmind.cluster_config import ENV_VARS

    names = set(ENV_VARS)
    assert names, "the launcher reads no variables?"
    assert names <= set(envvars.BY_NAME), sorted(names - set(envvars.BY_NAME))


def test_makefile_variables_are_registered():
    text = (REPO / "Makefile").read_text()
    names = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*\?=", text, re.M))
    names |= set(re.findall(r"\$\(or \$\(([A-Z_][A-Z0-9_]*)\)", text))
    assert {"PYTHON", "RUN_DIR", "LINES"} <= names, names
    assert names <= set(envvars.BY_NAME), sorted(names - set(envvars.BY_NAME))


def _table_names(table: str) -> list[str]:
    return re.findall(r"^\| `([A-Z_][A-Z0-9_]*)` \|", table, re.M)


def test_registry_defaults_match_the_shared_flag_defaults():
    from services.common.config import FlagParser, add_server_flags

    for prefix, port in zip(SERVICE_PREFIXES, (50051, 50052, 50053)):
        p = FlagParser()
        add_server_flags(p, prefix=prefix, port=port)
        checked = 0
        for action in p._actions:
            env = re.search(r"\[env (\w+)\]", action.help or "")
            if not env:
                continue
            default = action.default
            if isinstance(default, float) and default.is_integer():
                default = int(default)
            assert envvars.BY_NAME[env.group(1)].default == str(default), (env.group(1), default)
            checked += 1
        assert checked >= 8, f"only {checked} shared flags name their variable"


def test_documentation_tables_list_exactly_the_registry():
    expected = [v.name for v in envvars.REGISTRY]
    for rel in envvars.GENERATED_IN:
        text = (REPO / rel).read_text()
        table = envvars.generated_block(text)
        assert table is not None, f"{rel} has no generated configuration table (markers missing)"
        names = _table_names(table)
        assert sorted(set(names)) == sorted(expected), (
            f"{rel}: missing {sorted(set(expected) - set(names))}, extra {sorted(set(names) - set(expected))}"
        )
        assert len(names) == len(set(names)), f"{rel}: a variable is listed twice"
        assert table == envvars.markdown_table(), f"{rel} is stale: run python -m extmind.envvars --write"


def test_readme_table_is_in_its_configuration_section():
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Configuration\n(.*?)(?=^## )", text, re.M | re.S)
    assert section and envvars.BEGIN in section.group(1), "README.md's ## Configuration lacks the table"
