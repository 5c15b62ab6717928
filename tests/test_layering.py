"""The import contract, checked on the source (no import is run): each folder of ``gift_quant`` imports only
folders of a lower or equal rank, no modules import each other in a cycle, and no module reaches into
another module's private (underscore) names. Function-level imports count like top-level ones: a lazy
import is still a dependency."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gift_quant"

# lower may not import higher; names of a rank may import each other (without a cycle)
RANKS = (("errors", "settings", "version"), ("core", "config"), ("kernels",), ("nn",), ("io",), ("compress",), ("eval",),
         ("train",), ("integrations",), ("cli", "__init__"))
RANK = {name: i for i, names in enumerate(RANKS) for name in names}

# known exceptions, owned elsewhere; the test fails when one disappears, so the list only shrinks
KNOWN_CYCLES: set[frozenset] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = ("gift_quant",) + f.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolved(mod: str, node) -> list[tuple[str | None, str | None, str]]:
    """One import statement -> per alias (module, imported name or None, local name); module None if not ours."""
    if isinstance(node, ast.Import):
        return [(a.name if a.name.split(".")[0] == "gift_quant" else None, None, a.asname or a.name)
                for a in node.names]
    target = node.module or ""
    if node.level:
        here = (mod if _is_package(mod) else mod.rpartition(".")[0]).split(".")
        target = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
    if target.split(".")[0] != "gift_quant":
        return [(None, None, a.asname or a.name) for a in node.names]
    return [(f"{target}.{a.name}", None, a.asname or a.name) if f"{target}.{a.name}" in MODULES
            else (target, a.name, a.asname or a.name) for a in node.names]


def _imports(mod: str):
    """(imported module, imported name or None, local name, line) for every gift_quant import in ``mod``."""
    for node in ast.walk(ast.parse(MODULES[mod].read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target, name, local in _resolved(mod, node):
                if target is not None:
                    yield target, name, local, node.lineno


def _rank(mod: str) -> int:
    parts = mod.split(".")
    return RANK["__init__"] if len(parts) == 1 else RANK[parts[1]]


def _graph() -> dict[str, set[str]]:
    g = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _, _ in _imports(m):
            assert target in MODULES, f"{m} imports unknown module {target}"
            if target != m:
                g[m].add(target)
    return g


def _cycles(g: dict[str, set[str]]) -> set[frozenset]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_folder_has_a_rank():
    folders = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    files = {p.stem for p in PKG.glob("*.py")}
    assert folders | files <= set(RANK), sorted((folders | files) - set(RANK))


def test_no_upward_import():
    bad = [f"{m}:{line} imports {t} (rank {_rank(m)} < {_rank(t)})"
           for m in MODULES for t, _, _, line in _imports(m) if _rank(m) < _rank(t)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    found = _cycles(_graph())
    assert found - KNOWN_CYCLES == set(), sorted(sorted(c) for c in found - KNOWN_CYCLES)
    assert KNOWN_CYCLES - found == set(), f"fixed, remove from KNOWN_CYCLES: {KNOWN_CYCLES - found}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_across_modules():
    bad = []
    for m in MODULES:
        package = m if _is_package(m) else m.rpartition(".")[0]
        bound = {}  # local name -> the gift_quant module it names
        for t, name, local, line in _imports(m):
            if name is not None and _private(name):
                bad.append(f"{m}:{line} imports {t}.{name}")
            elif _private(t.rpartition(".")[2]) and t.rpartition(".")[0] != package:
                bad.append(f"{m}:{line} imports the private module {t} from outside its package")
            if name is None and "." not in local:
                bound[local] = t
        for node in ast.walk(ast.parse(MODULES[m].read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _private(node.attr)):
                bad.append(f"{m}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)
