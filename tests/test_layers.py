"""The packages' layers, read from the source with `ast` (nothing is imported): the library (src/trimformer)
never imports the lab (src/trimformer_lab); neither package has an import cycle, counting imports inside
functions too; no module is longer than 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("trimformer", "trimformer_lab")
LAB = "trimformer_lab"
MAX_LINES = 400


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of both packages (a package is named by its __init__.py)."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((SRC / package).rglob("*.py")):
            parts = list(path.relative_to(SRC).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = package_modules()


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of `from <level dots><module> import ...` written in `importer`."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imported_names(path: Path, importer: str) -> list[tuple[str, int, bool]]:
    """(absolute name, line, whether a name of that module is imported rather than the module itself) for
    every import statement of the file, at any depth (functions and classes included), and for
    importlib.import_module / __import__ calls with a literal string."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, importer, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:                          # `from package import submodule`
                    found.append((sub, node.lineno, False))
                else:                                       # a name defined in `base`
                    found.append((base, node.lineno, True))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.args[0].value, node.lineno, False))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {module it imports: line}. Importing a.b.c runs a/__init__ and a/b/__init__ first, so those
    count as imported too, except the importer's own enclosing packages (already running when it runs);
    taking a name from an enclosing package (`from . import NAME`) does count."""
    graph: dict[str, dict[str, int]] = {}
    for importer, path in MODULES.items():
        edges: dict[str, int] = {}
        own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
        for name, line, takes_name in imported_names(path, importer):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target not in MODULES or target == importer:
                    continue
                if target in own and not (takes_name and target == name):
                    continue
                edges.setdefault(target, line)
        graph[importer] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:          # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # shortest way back to `start` inside the component (breadth first)
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt_frontier = []
            for node in frontier:
                for nxt in sorted(graph[node]):
                    if nxt in members and nxt not in previous:
                        previous[nxt] = node
                        nxt_frontier.append(nxt)
            frontier = nxt_frontier
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


# ---- the checks ---------------------------------------------------------------------------------
def test_the_library_never_imports_the_lab():
    hits = []
    for module, path in MODULES.items():
        if module.split(".")[0] != "trimformer":
            continue
        for name, line, _ in imported_names(path, module):
            if name == LAB or name.startswith(LAB + "."):
                hits.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    assert not hits, "the library imports the lab:\n" + "\n".join(hits)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = import_graph()
    cycles = [c for c in find_cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not cycles, f"import cycles in {package}:\n" + "\n".join(describe(c, graph) for c in cycles)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_400_lines(package):
    long = [f"{path.relative_to(SRC)}: {n} lines" for name, path in MODULES.items()
            if name.split(".")[0] == package and (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


# ---- the checks' own machinery ------------------------------------------------------------------
def test_cycles_are_found_and_reported():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7}, "d": {"a": 1}, "e": {"e": 2}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert describe(["a", "b", "c", "a"], graph) == "a (line 3) -> b (line 5) -> c (line 7) -> a"


def test_imports_inside_functions_and_relative_ones_are_read(tmp_path):
    graph = import_graph()
    # evaluation/tasks.py: `from . import longbench as lb` is the submodule, not the package
    assert "trimformer_lab.evaluation.longbench" in graph["trimformer_lab.evaluation.tasks"]
    assert "trimformer_lab.evaluation" not in graph["trimformer_lab.evaluation.tasks"]
    # a lab module importing the library runs trimformer/__init__.py first
    assert "trimformer" in graph["trimformer_lab.cli"] and "trimformer.cli" in graph["trimformer_lab.cli"]
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ..evaluation import needle\n    import importlib\n"
                      "    importlib.import_module('trimformer_lab.bench')\n")
    names = imported_names(source, "trimformer_lab.train.mod")
    assert ("trimformer_lab.evaluation.needle", 2, False) in names
    assert ("trimformer_lab.bench", 4, False) in names


# ---- the lab's commands join the CLI through entry points ---------------------------------------
def test_the_lab_commands_join_the_cli():
    from trimformer.cli import build_parser
    from trimformer_lab.cli import missing_lab_dependencies

    commands = build_parser().get_default("commands")
    assert {"generate", "serve", "methods", "demo", "bench", "eval", "calibrate", "train-task",
            "train-merge"} <= set(commands)
    assert missing_lab_dependencies() == []          # scripts/setup.sh installs the lab extra


def test_a_command_whose_entry_point_fails_names_the_install(monkeypatch, capsys):
    import trimformer.cli as cli

    class Broken:
        name = "eval"

        def load(self):
            raise ImportError("No module named 'trimformer_lab'")

    monkeypatch.setattr(cli, "entry_points", lambda group: [Broken()])
    assert cli.main(["eval", "needle", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "`trimformer eval` is unavailable here" in err and 'pip install -e ".[lab]"' in err


def test_with_no_lab_an_unknown_command_names_the_install(monkeypatch, capsys):
    import trimformer.cli as cli

    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    assert cli.main(["bench", "prefill"]) == 2
    err = capsys.readouterr().err
    assert "no command 'bench' here" in err and 'pip install -e ".[lab]"' in err


def test_a_lab_command_without_the_lab_extra_says_what_to_install(monkeypatch, capsys):
    import trimformer.cli as cli
    import trimformer_lab.cli as lab

    monkeypatch.setattr(lab, "missing_lab_dependencies", lambda: ["rouge-score"])
    assert cli.main(["bench", "prefill", "--lengths", "64"]) == 2
    err = capsys.readouterr().err
    assert "`trimformer bench` needs the lab's dependencies (rouge-score not installed)" in err
    assert 'pip install -e ".[lab]"' in err
