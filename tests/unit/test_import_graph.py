"""pdserve's modules import one another without circles, counting imports inside
functions too (an import moved into a function hides a circle, it does not untie it)."""

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"


def module_files() -> dict[str, Path]:
    files = {}
    for path in SERVICES.rglob("*.py"):
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            parts = ["pdserve", *path.relative_to(SERVICES).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    def owner(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        # A module's own parent packages run before it anyway; they are not a circle.
        graph[module] = {o for n in names if (o := owner(n)) and o != module and not module.startswith(o + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle_of_three_and_leaves_out_a_module_that_only_enters_it():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_pdserve_module_imports_itself_through_others():
    files = module_files()
    assert "pdserve.router.router" in files
    assert circles(import_graph(files)) == []
