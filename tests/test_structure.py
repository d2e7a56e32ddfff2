"""The shape of the code: small modules and functions, no import cycles among top-level
imports, and method names spelled only in the registries and the recipes."""

import ast
import re
from pathlib import Path

PETRA = Path(__file__).resolve().parents[1] / "petra"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def modules():
    return sorted(PETRA.rglob("*.py"))


def name_of(path: Path) -> str:
    parts = path.relative_to(PETRA.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_or_function_is_too_long():
    long_modules = [f"{p.relative_to(PETRA.parent)}: {n}" for p in modules()
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    long_functions = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name_of(path)}.{node.name}: {lines}")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_top_level_imports_form_no_cycle():
    graph = {}
    for path in modules():
        name = name_of(path)
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only: lazy imports are free
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "petra") and node.level == 0:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("petra")}
        graph[name] = {d for d in deps if d != name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            assert state.get(dep) != 1, " -> ".join([*trail, node, dep])
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_search_space_and_loop_code_name_no_method():
    """Generic code asks the registry metadata; only registries and recipes spell methods."""
    from petra.registry import REGISTRIES

    # none, fixed and energy are the defaults every gene starts from, not a method choice
    names = {n for kind in ("pruning", "quantization", "regularizer", "sparsity_rule",
                            "rank_rule") for n in REGISTRIES[kind].names()}
    names -= {"none", "fixed", "energy"}
    generic = [PETRA / "space.py", PETRA / "layers.py", PETRA / "genes.py",
               PETRA / "engine" / "loop.py", *sorted((PETRA / "engine" / "strategies").glob("*.py"))]
    found = []
    for path in generic:
        text = path.read_text()
        if path.parent.name == "strategies":  # its registrations name strategies
            text = re.sub(r"@STRATEGIES\.register\([^)]*\)|\n    name = \"\w+\"", "", text)
        found += [f"{path.name}: {n}" for n in names if re.search(rf"[\"']{n}[\"']", text)]
    assert not found, found


def test_weighted_layer_types_are_named_once():
    """Conv3d was once added to six tuples by hand: the conv and weighted types live in kinds.py."""
    from petra.compress.kinds import WEIGHTED_LAYERS
    from petra.layers import PRUNABLE_TYPES

    assert PRUNABLE_TYPES == tuple(t.__name__ for t in WEIGHTED_LAYERS)
    spelled = re.compile(r"nn\.Conv[123]d\s*[|,]\s*nn\.Conv[123]d")
    found = [str(p.relative_to(PETRA.parent)) for p in modules()
             if p.name != "kinds.py" and spelled.search(p.read_text())]
    assert not found, found
