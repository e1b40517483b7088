"""The project's layers, read from its imports: no import cycle, a pure ML core, a product that does not need
its benchmarks.

Every import counts, including those inside functions: a deferred import still ties two modules together.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("expunge", "expunge_ml", "tasks", "flows", "models_registry", "db", "benchmarks")
PRODUCT = ("expunge", "tasks", "flows", "models_registry", "db")
FRAMEWORKS = ("prefect", "mlflow", "sqlalchemy", "alembic")


def project_modules() -> dict[str, Path]:
    """Dotted module name → file, for every .py file under the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported dotted name, at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level run at import too
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import name`: the submodule `package.name` where there is one, else `package`
            found += [(f"{base}.{alias.name}", id(node) in top_level) for alias in node.names]
    return found


def _project_target(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest project module a dotted import name refers to (a name imported from a module is that module)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imported, at_top in _imports(name, path):
            target = _project_target(imported, modules)
            if target and target != name and (at_top or not module_level_only):
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_reads_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "expunge_ml.methods.ga" in graph["expunge_ml.methods.registry"]  # `from . import ga`
    assert "flows.process_request" in graph["expunge.service"]  # imported inside run_request
    assert "flows.process_request" not in import_graph(module_level_only=True)["expunge.service"]


def test_no_import_cycle_between_the_projects_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_ml_core_imports_no_orchestration_registry_or_database_framework():
    offenders = []
    for name, path in project_modules().items():
        if name.split(".")[0] != "expunge_ml":
            continue
        for imported, _ in _imports(name, path):
            if imported.split(".")[0] in FRAMEWORKS:
                offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders


def test_the_product_does_not_import_the_benchmarks_at_module_level():
    graph = import_graph(module_level_only=True)
    offenders = [f"{name} -> {target}" for name, targets in graph.items() if name.split(".")[0] in PRODUCT
                 for target in targets if target.split(".")[0] == "benchmarks"]
    assert not offenders, offenders


def test_the_cli_starts_without_the_benchmarks_or_torch(tmp_path):
    """`expunge --help` and `expunge status` load neither the benchmarks nor torch; the `benchmark` commands load
    their modules on use."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from expunge.cli import app\n"
        "loaded = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'benchmarks', 'torch'})\n"
        "print('import', loaded())\n"
        "for args in (['--help'], ['--home', sys.argv[1], '--profile', 'tiny', 'status']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "print('status', loaded())\n"
        "assert CliRunner().invoke(app, ['benchmark', '--help']).exit_code == 0\n"
        "print('benchmark', 'benchmarks' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "home")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["import []", "status []", "benchmark True"], done.stdout
