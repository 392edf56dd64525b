"""No import cycle inside mage_fast.

The graph is read from the source with ``ast``, not by importing: an edge A -> B for every
``import`` that runs when A is imported (statements at module level, in class bodies and under
``if`` / ``try`` / ``with`` there). That graph must be acyclic.

Imports inside functions are excluded from that first check: they run when the function is called,
normally after every module involved has finished importing, so they do not break an import. They
still tie two modules to each other, so a second check counts them too and allows only the known
cycles listed below. ``if TYPE_CHECKING:`` blocks are left out (they never run).

``from P import name`` is an edge to the module ``P.name`` when there is one, else to ``P``.
Importing a submodule also imports its parent packages, which Python has finished or started by
then, so those implicit edges are not counted.
"""
import ast
import os

PACKAGE = "mage_fast"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Cycles through imports inside functions that are tolerated, each one strongly connected component.
# None: the models sit between a state-dict layer below them and a loading layer above them.
KNOWN_DEFERRED_CYCLES: list = []


def _modules() -> dict:
    """Module name -> (path, is_package) for every .py file under the package."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].split(os.sep)
            is_pkg = rel[-1] == "__init__"
            name = ".".join(rel[:-1] if is_pkg else rel)
            out[name] = (os.path.join(folder, f), is_pkg)
    return out


def _module_level(body, deferred: bool = False):
    """The statements of ``body`` that run at import time (not inside TYPE_CHECKING blocks, nor
    inside functions unless ``deferred``)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if deferred:
                yield from _module_level(node.body, deferred)
            continue
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                yield from _module_level(node.orelse, deferred)
                continue
            yield from _module_level(node.body, deferred)
            yield from _module_level(node.orelse, deferred)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(part, deferred)
        elif isinstance(node, (ast.With, ast.ClassDef, ast.For, ast.While)):
            yield from _module_level(node.body, deferred)
        else:
            yield node


def import_graph(deferred: bool = False) -> dict:
    """Module name -> set of package modules it imports at module level (``deferred``: and inside
    functions)."""
    modules = _modules()
    graph = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in _module_level(tree.body, deferred):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for a in node.names:
                    sub = f"{source}.{a.name}"
                    targets.append(sub if sub in modules else source)
            for t in targets:
                while t and t not in modules and "." in t:  # `import mage_fast.x.y` where y is a name
                    t = t.rpartition(".")[0]
                if t in modules and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), as sorted lists."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The reader finds the package's real imports (so an empty graph cannot pass for an acyclic one)."""
    g = import_graph()
    assert "mage_fast.decoding.generate" in g["mage_fast.decoding"]
    assert "mage_fast.decoding.modes" in g["mage_fast.decoding.generate"]
    assert "mage_fast.models.checks" in g["mage_fast.models.mage"]
    assert "mage_fast.ops.decode_step" in g["mage_fast.decoding.remask"]


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_the_package():
    found = cycles(import_graph())
    assert not found, f"import cycles through module-level imports: {found}"


def test_imports_inside_functions_close_no_new_cycle():
    """Counting the imports inside functions too, the only cycles are the known ones (the sampler's
    decoding/modes.py <-> sampling.py circle is gone: the model turns ids into pixels)."""
    found = [c for c in cycles(import_graph(deferred=True)) if set(c) not in KNOWN_DEFERRED_CYCLES]
    assert not found, f"import cycles through imports inside functions: {found}"
    # the reader tells the two kinds apart: the CLI imports the sampler inside its functions, no CLI module
    # at its top level
    assert "mage_fast.decoding" in import_graph(deferred=True)["mage_fast.cli.common"]
    eager = import_graph()
    cli = [m for m in eager if m == "mage_fast.cli" or m.startswith("mage_fast.cli.")]
    assert {"mage_fast.cli.common", "mage_fast.cli.generate", "mage_fast.cli.inpaint"} <= set(cli)
    assert [m for m in cli if "mage_fast.decoding" in eager[m]] == []
