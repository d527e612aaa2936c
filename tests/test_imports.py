"""The import graph of `lemb/`, read from the source: layers import only downward and no module imports itself
through others. Ground modules (errors, files, vocabulary) import no other lemb module; above them
data < pipeline < stages < trainer < workflow / commands / cli."""

import ast
import re
from pathlib import Path

import lemb

ROOT = Path(lemb.__file__).parent
GROUND = {"lemb", "lemb.errors", "lemb.files", "lemb.vocabulary"}
LAYERS = ["data", "pipeline", "stages", "trainer", "top"]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every lemb module `path` imports, at module level or inside functions (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lemb"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lemb"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module(p): p for p in ROOT.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in paths and i != m} for m, p in paths.items()}


def _layer(module: str) -> int:
    if module in GROUND:
        return -1
    part = module.split(".")[1]
    return LAYERS.index(part) if part in LAYERS else LAYERS.index("top")


def test_layers_import_only_downward():
    upward = [(m, i) for m, deps in _graph().items() for i in deps if _layer(i) > _layer(m)]
    assert upward == []
    ground = [(m, i) for m, deps in _graph().items() if m in GROUND for i in deps if i not in GROUND]
    assert ground == []


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    private = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lemb"):
                private += [f"{_module(path)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def _private_uses(source: str) -> list[str]:
    """`name._attr` where `name` is something imported from another lemb module (a module, a class, a function) or
    a variable bound to a call of one (`codec = LLMBackend(); codec._init_codec(...)`), and `Imported()._attr`."""
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lemb"):
            imported.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("lemb"))
    foreign = set(imported)
    for node in ast.walk(tree):
        call = getattr(node, "value", None)
        if isinstance(node, ast.Assign) and isinstance(call, ast.Call) and getattr(call.func, "id", None) in imported:
            foreign.update(t.id for t in node.targets if isinstance(t, ast.Name))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value.func if isinstance(node.value, ast.Call) else node.value
            names = imported if isinstance(node.value, ast.Call) else foreign
            while isinstance(owner, ast.Attribute):  # lemb.files._tmp: the chain's root name
                owner = owner.value
            if isinstance(owner, ast.Name) and owner.id in names:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    uses = {str(p.relative_to(ROOT.parent)): _private_uses(p.read_text()) for p in ROOT.rglob("*.py")}
    assert {path: found for path, found in uses.items() if found} == {}
    # the check finds what it is for
    assert _private_uses("from lemb.stages.llm import LLMBackend\ncodec = LLMBackend()\ncodec._init_codec(t, None)\n")
    assert _private_uses("import lemb.files\nlemb.files._tmp()\n") == ["line 2: lemb.files._tmp"]
    assert _private_uses("from lemb.x import Y\nY()._z()\n") and not _private_uses("self._x = 1\n")


def test_one_function_replaces_files():
    callers = [p.relative_to(ROOT.parent) for p in ROOT.rglob("*.py") if "os.replace(" in p.read_text()]
    assert [str(p) for p in callers] == ["lemb/files.py"]


def test_no_stage_spells_a_run_folders_layout():
    """Every path of a run folder comes from RunLayout: `x / "label"` and the like appear nowhere else."""
    pattern = re.compile(r'/ "(retrieve|label|train|eval|rescore|keys|candidates|model|_manifest\.json)"')
    spelled = [
        f"{p.relative_to(ROOT.parent)}:{i}: {line.strip()}"
        for p in ROOT.rglob("*.py")
        if p.name != "layout.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert spelled == []
