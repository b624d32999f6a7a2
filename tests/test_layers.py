"""The layers of docs/guide "Layers" hold: every import of pipelines/, lance_tables/, jobs/ and infra/ runs downwards.

compute core -> schemas -> storage -> engines -> jobs -> CLI and the Polars API; `infra/` imports the project
and nothing imports `infra/`. Every import counts: module level, inside functions, and under `TYPE_CHECKING`
(a type-only import is still a dependency of the code that names the type). The checks are plain functions
over `ast`, exercised first on small synthetic modules that reproduce violations this project once had.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "lance_tables", "jobs", "infra")

# Lowest first: a module may import its own layer or a lower one, never a higher one.
LAYERS = ("core", "schemas", "storage", "engines", "jobs", "interfaces", "infra")

# Every module of the four packages, with its layer. A module missing here fails the test: place it on purpose.
LAYER_OF: dict[str, str] = {
    # The engine-free compute core: decode, detect, embed, score. No storage, no engine, no settings tree.
    "pipelines": "core",
    "pipelines.errors": "core",
    "pipelines.faults": "core",
    "pipelines.vocab": "core",
    "pipelines.samples": "core",
    "pipelines.prefetch": "core",
    "pipelines.decode": "core",
    "pipelines.faces": "core",
    "pipelines.clip": "core",
    "pipelines.models": "core",
    "pipelines.matcher": "core",
    "pipelines.delta": "core",
    "pipelines.kernels": "core",
    "pipelines.signing": "core",
    "pipelines.task": "core",
    "pipelines.accuracy": "core",
    "pipelines.calibration": "core",
    "pipelines.facenet_convert": "core",
    "pipelines.sheet": "core",
    "pipelines.files": "core",
    # What persisted data looks like, declared once, and how values are quoted into its predicates.
    "pipelines.schemas": "schemas",
    "pipelines.sql": "schemas",
    # Bytes at rest, through the one seam (storage/objectstore/s3store), and what reads or writes through it:
    # the settings tree (it builds the seam), result sets, audit, locks, the input files people hand in
    # (shards, embeddings, probes), the ingest stages that read shards, match units that read Lance fragments.
    "pipelines.storage": "storage",
    "pipelines.objectstore": "storage",
    "pipelines.s3store": "storage",
    "pipelines.settings": "storage",
    "pipelines.results": "storage",
    "pipelines.audit": "storage",
    "pipelines.audit_verify": "storage",
    "pipelines.locks": "storage",
    "pipelines.shards": "storage",
    "pipelines.importer": "storage",
    "pipelines.probes": "storage",
    "pipelines.prepare": "storage",
    "pipelines.embed": "storage",
    "pipelines.match_unit": "storage",
    "lance_tables": "storage",
    "lance_tables.ann": "storage",
    "lance_tables.calibrations": "storage",
    "lance_tables.delta": "storage",
    "lance_tables.erasure": "storage",
    "lance_tables.ledger": "storage",
    "lance_tables.reviews": "storage",
    "lance_tables.sources": "storage",
    "lance_tables.store": "storage",
    "lance_tables.watchlists": "storage",
    # Engines run units of work and own their runtime (Ray started here, the Modal app defined here).
    "pipelines.engines": "engines",
    "pipelines.engines.local": "engines",
    "pipelines.engines.ray": "engines",
    "pipelines.engines.modal": "engines",
    # Jobs: every state change and its audit record, and the reads the commands show.
    "jobs": "jobs",
    "jobs.accuracy": "jobs",
    "jobs.admin": "jobs",
    "jobs.models": "jobs",
    "jobs.sheet": "jobs",
    "jobs.audit_job": "jobs",
    "jobs.erase": "jobs",
    "jobs.erase_steps": "jobs",
    "jobs.exits": "jobs",
    "jobs.import_embeddings": "jobs",
    "jobs.nightly": "jobs",
    "jobs.ingest": "jobs",
    "jobs.match": "jobs",
    "jobs.options": "jobs",
    "jobs.report": "jobs",
    "jobs.result_sets": "jobs",
    "jobs.retention": "jobs",
    "jobs.review": "jobs",
    "jobs.session": "jobs",
    "jobs.status": "jobs",
    "jobs.watchlist": "jobs",
    # What people and data teams call: the command line (thin) and the Polars API.
    "jobs.cli": "interfaces",
    "jobs.cli_accountability": "interfaces",
    "jobs.cli_accuracy": "interfaces",
    "jobs.api": "interfaces",
    "jobs.serve": "interfaces",
    # Deployment wrappers: import the project; nothing imports them.
    "infra": "infra",
    "infra.modal_app": "infra",
}

CORE_LAYERS = ("core",)
STORAGE_LIBRARIES = ("lancedb", "lance", "boto3", "botocore", "pyarrow.fs", "s3fs", "fsspec")
ENGINE_LIBRARIES = ("ray", "modal")
CLI_MODULES = ("jobs.cli", "jobs.cli_accountability")  # and any jobs.cli_* added later
CLI_MAY_IMPORT = ("jobs", "pipelines.settings", "pipelines.errors")  # jobs do the reads and writes
SCHEMA_HOME = "pipelines.schemas"


@dataclass(frozen=True)
class Import:
    """One imported name: the dotted targets it may mean, where, and whether only type checkers run it."""

    names: tuple[str, ...]  # `from a.b import c` -> ("a.b.c", "a.b"): a submodule or a name of a.b
    line: int
    type_only: bool


@dataclass(frozen=True)
class Scan:
    imports: tuple[Import, ...]
    calls: tuple[tuple[str, int], ...]  # (dotted callee, line) of every call, e.g. ("ray.init", 12)
    schema_calls: tuple[int, ...]  # lines of `pa.schema(...)` / `pyarrow.schema(...)`


def scan(source: str, module: str, is_package: bool = False) -> Scan:
    """Every import of a module's source (any depth, `TYPE_CHECKING` blocks marked), its calls, its schemas."""
    tree = ast.parse(source)
    imports: list[Import] = []
    calls: list[tuple[str, int]] = []
    schemas: list[int] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            imports.extend(Import((alias.name,), node.lineno, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}".strip(".")
            imports.extend(Import((f"{base}.{a.name}", base), node.lineno, type_only) for a in node.names)
        elif isinstance(node, ast.Call):
            callee = _dotted(node.func)
            if callee:
                calls.append((callee, node.lineno))
                if callee in ("pa.schema", "pyarrow.schema"):
                    schemas.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return Scan(tuple(imports), tuple(calls), tuple(schemas))


def _is_type_checking(test: ast.expr) -> bool:
    return _dotted(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def scan_project(root: Path = ROOT) -> dict[str, Scan]:
    return {
        name: scan(path.read_text(), name, path.name == "__init__.py") for name, path in project_modules(root).items()
    }


def resolve(imp: Import, known: Iterable[str]) -> str | None:
    """The project module an import reaches (a submodule if it is one, else the module named), or None."""
    known = set(known)
    for name in imp.names:
        if name in known:
            return name
    first = imp.names[-1]
    return first if first.split(".")[0] in PACKAGES else None  # a project name that is no module: reported


def _is(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_problems(scans: Mapping[str, Scan], layer_of: Mapping[str, str]) -> list[str]:
    """Modules the table does not place (or places but do not exist) and imports that go up a layer."""
    problems = [f"{m}: not in the layer table (place it in tests/test_layers.py)" for m in scans if m not in layer_of]
    problems += [f"{m}: in the layer table but no such module" for m in layer_of if m not in scans]
    for module, found in scans.items():
        if module not in layer_of:
            continue
        rank = LAYERS.index(layer_of[module])
        for imp in found.imports:
            target = resolve(imp, scans)
            if target is None:
                continue
            if target not in layer_of:
                problems.append(f"{module}:{imp.line} imports {target}, which is not a module in the layer table")
            elif LAYERS.index(layer_of[target]) > rank:
                kind = " (type-only)" if imp.type_only else ""
                problems.append(
                    f"{module}:{imp.line} ({layer_of[module]}) imports {target} ({layer_of[target]}){kind}: upwards"
                )
    return problems


def core_problems(scans: Mapping[str, Scan], layer_of: Mapping[str, str]) -> list[str]:
    """The core names no storage or engine library (and, by the layer rule, no storage module)."""
    problems = []
    for module, found in scans.items():
        if layer_of.get(module) not in CORE_LAYERS:
            continue
        for imp in found.imports:
            hit = next((n for n in imp.names if _is(n, STORAGE_LIBRARIES + ENGINE_LIBRARIES)), None)
            if hit:
                problems.append(f"{module}:{imp.line} (core) imports {hit}")
    return problems


def infra_problems(scans: Mapping[str, Scan]) -> list[str]:
    return [
        f"{module}:{imp.line} imports {resolve(imp, scans)}: nothing imports infra/"
        for module, found in scans.items()
        if not _is(module, ("infra",))
        for imp in found.imports
        if _is(resolve(imp, scans) or "", ("infra",))
    ]


def runtime_problems(scans: Mapping[str, Scan]) -> list[str]:
    """Jobs never import Ray or Modal, nor start Ray: the engines own their runtime."""
    problems = []
    for module, found in scans.items():
        if not _is(module, ("jobs",)):
            continue
        for imp in found.imports:
            if imp.names[0].endswith(".start_ray"):
                problems.append(f"{module}:{imp.line} imports {imp.names[0]}")
            elif _is(imp.names[-1], ENGINE_LIBRARIES):
                problems.append(f"{module}:{imp.line} imports {imp.names[-1]}")
        for callee, line in found.calls:
            if callee.split(".")[-1] == "start_ray" or callee == "ray.init":
                problems.append(f"{module}:{line} calls {callee}")
    return problems


def cli_problems(scans: Mapping[str, Scan]) -> list[str]:
    """The command line is thin: at run time it reaches jobs (and the settings it loads), never tables or files."""
    problems = []
    for module, found in scans.items():
        if module not in CLI_MODULES and not module.startswith("jobs.cli_"):
            continue
        for imp in found.imports:
            target = resolve(imp, scans)
            if target is None or imp.type_only:
                continue
            if not (target in CLI_MODULES or target.startswith("jobs.cli_") or _is(target, CLI_MAY_IMPORT)):
                problems.append(f"{module}:{imp.line} imports {target}: the CLI reads and writes through jobs")
    return problems


def schema_problems(scans: Mapping[str, Scan]) -> list[str]:
    return [
        f"{module}:{line} declares a pa.schema: declare it once, in {SCHEMA_HOME}"
        for module, found in scans.items()
        if module != SCHEMA_HOME
        for line in found.schema_calls
    ]


def package_edges(scans: Mapping[str, Scan]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, found in scans.items():
        for imp in found.imports:
            target = resolve(imp, scans)
            if target is not None and target.split(".")[0] != module.split(".")[0]:
                edges.setdefault(module.split(".")[0], set()).add(target.split(".")[0])
    return edges


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle of the directed graph as a path that returns to its start, or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


# ---- the checks, first on synthetic modules that repeat this project's past violations ----------------------


def test_graph_finds_cycles() -> None:
    assert find_cycle({"pipelines": {"lance_tables"}, "lance_tables": {"pipelines"}}) == [
        "lance_tables",
        "pipelines",
        "lance_tables",
    ]
    long = {"pipelines": {"infra"}, "infra": {"jobs"}, "jobs": {"pipelines", "lance_tables"}, "lance_tables": set()}
    assert find_cycle(long) == ["infra", "jobs", "pipelines", "infra"]
    assert (
        find_cycle({"jobs": {"pipelines", "lance_tables"}, "lance_tables": {"pipelines"}, "pipelines": set()}) is None
    )
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def synthetic(**sources: str) -> dict[str, Scan]:
    return {name.replace("__", "."): scan(text, name.replace("__", ".")) for name, text in sources.items()}


def test_checks_catch_the_old_violations() -> None:
    scans = synthetic(
        pipelines__api="def results():\n    from lance_tables.store import Gallery\n",  # a function-level import
        pipelines__engines__modal="def run_modal():\n    from infra.modal_app import app\n",
        pipelines__match_unit="def run_unit():\n    import lance\n",
        pipelines__signing="if TYPE_CHECKING:\n    from pipelines.storage import Storage\n",
        pipelines__storage="import boto3\n",
        lance_tables__store="from pipelines.storage import Storage\n",
        jobs__ingest="from pipelines.engines.ray import start_ray\n\ndef run():\n    start_ray(None, None)\n",
        jobs__match="import ray\n\ndef go():\n    ray.init()\n",
        jobs__cli="def sources_list():\n    from lance_tables.sources import list_sources\n",
        jobs__shiny="import pyarrow as pa\nSCHEMA = pa.schema([])\n",
        infra__modal_app="from jobs.ingest import run_ingest\nfrom pipelines.engines.modal import app\n",
    )
    table = {
        "pipelines.api": "core",
        "pipelines.engines.modal": "engines",
        "pipelines.match_unit": "core",
        "pipelines.signing": "core",
        "pipelines.storage": "storage",
        "lance_tables.store": "storage",
        "jobs.ingest": "jobs",
        "jobs.match": "jobs",
        "jobs.cli": "interfaces",
        "infra.modal_app": "infra",
        "pipelines.gone": "core",
    }
    layers = layer_problems(scans, table)
    assert "jobs.shiny: not in the layer table (place it in tests/test_layers.py)" in layers
    assert "pipelines.gone: in the layer table but no such module" in layers
    assert any(p.startswith("pipelines.api:2 (core) imports lance_tables.store (storage)") for p in layers)
    assert any(
        p.startswith("pipelines.signing:2 (core) imports pipelines.storage (storage) (type-only)") for p in layers
    )
    assert any(p.startswith("pipelines.engines.modal:2 (engines) imports infra.modal_app (infra)") for p in layers)
    assert core_problems(scans, table) == ["pipelines.match_unit:2 (core) imports lance"]
    assert infra_problems(scans) == ["pipelines.engines.modal:2 imports infra.modal_app: nothing imports infra/"]
    assert runtime_problems(scans) == [
        "jobs.ingest:1 imports pipelines.engines.ray.start_ray",
        "jobs.ingest:4 calls start_ray",
        "jobs.match:1 imports ray",
        "jobs.match:4 calls ray.init",
    ]
    assert cli_problems(scans) == ["jobs.cli:2 imports lance_tables.sources: the CLI reads and writes through jobs"]
    assert schema_problems(scans) == ["jobs.shiny:2 declares a pa.schema: declare it once, in pipelines.schemas"]
    cycle = find_cycle(package_edges(scans))
    assert cycle is not None and cycle[0] == cycle[-1] and {"infra", "pipelines"} <= set(cycle)  # engine -> infra
    scans.pop("pipelines.engines.modal")
    assert find_cycle(package_edges(scans)) == ["lance_tables", "pipelines", "lance_tables"]  # the old api


def test_scan_sees_every_kind_of_import() -> None:
    found = scan(
        "import a.b as c\nfrom . import sibling\nfrom ..up import thing\n"
        "def f():\n    import inner\n    class K:\n        def m(self):\n            from deep import x\n"
        "if TYPE_CHECKING:\n    import typed\nelse:\n    import untyped\n",
        "pipelines.engines.modal",
    )
    got = {imp.names[0]: imp.type_only for imp in found.imports}
    assert got == {
        "a.b": False,
        "pipelines.engines.sibling": False,
        "pipelines.up.thing": False,
        "inner": False,
        "deep.x": False,
        "typed": True,
        "untyped": False,
    }


# ---- the checks on the project as it is ---------------------------------------------------------------------


@functools.cache
def project() -> dict[str, Scan]:
    return scan_project()


def no_problems(problems: list[str]) -> None:
    assert not problems, "\n".join(["", *dict.fromkeys(problems)])


def test_every_module_has_a_layer_and_imports_go_down() -> None:
    no_problems(layer_problems(project(), LAYER_OF))


def test_core_names_no_storage_or_engine_library() -> None:
    no_problems(core_problems(project(), LAYER_OF))


def test_nothing_imports_infra() -> None:
    no_problems(infra_problems(project()))


def test_jobs_leave_the_runtime_to_the_engines() -> None:
    no_problems(runtime_problems(project()))


def test_cli_reads_and_writes_through_jobs() -> None:
    no_problems(cli_problems(project()))


def test_schemas_are_declared_once() -> None:
    no_problems(schema_problems(project()))


def test_top_level_packages_are_acyclic() -> None:
    edges = package_edges(project())
    assert find_cycle(edges) is None, edges
    assert edges["pipelines"] == set() and edges["infra"] >= {"pipelines"}  # the core package stands alone
