"""The import layers, read from every module's source (function-level imports included):

    command lines   unicap.cli, pipelines.demo, train.launch     may import anything; nothing imports them
    jobs, trainer   pipelines/, train/                            pipelines may use train's code (pack uses its
                                                                  buckets); train reads what the jobs write only
                                                                  through unicap.contract, never their code
    ingest          datagen/
    core            unicap/  (unicap.contract at its bottom: it imports only itself, atomic and config)

A module imports only its own layer or the layers below; no cycles among modules. Code under
`if __name__ == "__main__":` is a command line too and is not checked (`python -m pipelines.caption`
uses unicap.cli.module_main there). unicap.cli dispatches by importlib strings: not an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"unicap": 0, "datagen": 1, "pipelines": 2, "train": 2}
ENTRY_POINTS = {"unicap.cli", "pipelines.demo", "train.launch"}
CONTRACT_MAY_IMPORT = ("unicap.contract", "unicap.atomic", "unicap.config", "unicap.storage", "unicap.storage_errors")
NOT_IMPORTABLE = ("tests", "bench", "tools")  # code that runs the packages; the packages never import it
# Cycles known when this check was written, to untangle; a new cycle fails, and so does a known one that
# is gone (remove it here). train.checkpoint <-> train.convert: export_diffusers / convert's main.
KNOWN_CYCLES: list[list[str]] = []


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in LAYER for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imports_of(source: str, module: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported first-party module) for every import outside `if __name__ == "__main__":`."""
    package = module if f"{module}.__init__" in known else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in known else base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    top = {m.split(".")[0] for m in known} | set(NOT_IMPORTABLE)
    return [(line, m) for line, m in found if m.split(".")[0] in top]


def violations(module: str, imported: str) -> list[str]:
    """Why `module` may not import `imported` (empty: allowed)."""
    if module in ENTRY_POINTS:
        return []
    top, target = module.split(".")[0], imported.split(".")[0]
    if target in NOT_IMPORTABLE:
        return [f"{module} imports {imported}: the packages never import {target}/"]
    out = []
    if imported in ENTRY_POINTS:
        out.append(f"{module} imports the command line {imported}")
    if LAYER[target] > LAYER[top]:
        out.append(f"{module} ({top}/, layer {LAYER[top]}) imports {imported} ({target}/, layer {LAYER[target]})")
    if top == "train" and target == "pipelines":
        out.append(f"{module} imports {imported}: the trainer reads the jobs' outputs through unicap.contract")
    if module.startswith("unicap.contract") and not imported.startswith(CONTRACT_MAY_IMPORT):
        out.append(f"{module} imports {imported}: the contract imports only {CONTRACT_MAY_IMPORT}")
    return out


def import_graph() -> dict[str, list[tuple[int, str]]]:
    modules = first_party_modules()
    known = set(modules) | {f"{m}.__init__" for m, p in modules.items() if p.name == "__init__.py"}
    return {m: imports_of(p.read_text(), m, known) for m, p in modules.items()}


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, []):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(LAYER), f"place the new package(s) {packages - set(LAYER)} in LAYER"


def test_imports_only_go_down():
    graph = import_graph()
    problems = [
        f"{m}:{line}: {why}" for m, imps in graph.items() for line, target in imps for why in violations(m, target)
    ]
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {m: sorted({t for _, t in imps if t != m}) for m, imps in import_graph().items()}
    found = cycles(graph)
    assert [c for c in found if c not in KNOWN_CYCLES] == [], f"import cycles: {found}"
    assert [c for c in KNOWN_CYCLES if c not in found] == [], "a known cycle is gone: remove it from KNOWN_CYCLES"


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("unicap.tiny_vlm", "from datagen import synth", "layer 1"),
        ("unicap.clip", "def f():\n    from pipelines.score import ScoreStage", "layer 2"),
        ("datagen.score_tables", "from pipelines.stages import parse_target", "layer 2"),
        ("train.data", "import pipelines.pack", "through unicap.contract"),
        ("train.packed_stage", "import pipelines.pack", "through unicap.contract"),
        ("train.batch_plan", "from pipelines.pack_manifest import manifest_keys", "through unicap.contract"),
        ("unicap.contract.scores", "from unicap.decode import decode_image", "the contract imports only"),
        ("pipelines.score", "from pipelines.demo import main", "command line"),
        ("unicap.engines", "from tests.conftest import free_port", "never import tests"),
    ],
)
def test_the_check_catches_an_upward_import(module, source, expected):
    known = set(first_party_modules()) | {"unicap.__init__", "datagen.__init__"}
    found = [why for _, target in imports_of(source, module, known) for why in violations(module, target)]
    assert any(expected in why for why in found), found


def test_the_check_skips_main_guards_and_finds_cycles():
    known = set(first_party_modules())
    main = 'if __name__ == "__main__":\n    from unicap.cli import module_main\n'
    assert imports_of(main, "pipelines.caption", known) == []
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
