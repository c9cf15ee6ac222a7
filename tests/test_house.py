"""The house's shape: dependencies point one way. No import circle among the project's modules,
counting imports inside functions too (they are circles all the same, only deferred)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = {"distill": REPO / "distill", "distill_launcher": REPO / "launcher"}


def project_modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, modules: dict) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (``launcher.x`` is ``distill_launcher.x``)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            candidate = "distill_launcher" + candidate[len("launcher"):] if candidate.startswith("launcher.") else candidate
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
            # Importing a.b.c runs the packages a and a.b first (but not the importer's own packages, already loading).
            parent = candidate.rpartition(".")[0]
            while parent:
                if parent in modules and not name.startswith(parent + "."):
                    targets.add(parent)
                parent = parent.rpartition(".")[0]
    return targets


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
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
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    modules = project_modules()
    edges = {name: imports(name, path, modules) for name, path in modules.items()}
    assert len(modules) > 30 and edges["distill.job"]  # the walk sees the project
    assert circles(edges) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_package_of_the_library_is_in_the_wheel():
    """pyproject.toml lists the packages by hand (the launcher is renamed in the wheel): a new subpackage must be listed."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("distill", *init.parent.relative_to(PACKAGES["distill"]).parts)) for init in PACKAGES["distill"].rglob("__init__.py")}
    assert found - listed == set()


def test_every_torch_free_module_imports_first():
    """Each module of the torch-free packages the command line loads at start imports on its own, in a fresh interpreter: no package
    half-loaded by another that needs it (as distill.terms once was by distill.config)."""
    import subprocess
    import sys

    light = [name for name in project_modules() if name.startswith(("distill.config", "distill.terms", "distill_launcher"))]
    failed = []
    for name in light:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=REPO)
        if result.returncode:
            failed.append(f"{name}: {result.stderr.strip().splitlines()[-1]}")
    assert not failed, "\n".join(failed)


def test_no_module_imports_an_extras_package_when_it_loads():
    """The core install (no extras) must run the default job: a package an extra brings (distill.extras.EXTRAS) is imported only
    inside the function that needs it, never when a module loads; the end-to-end proof is benchmarks/install_size.py --smoke."""
    from distill.extras import EXTRAS

    offenders = []
    for name, path in project_modules().items():
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions and classes' methods are deferred
            if isinstance(node, (ast.If, ast.Try)):  # a guarded import at module level still runs when the module loads
                nested = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
            else:
                nested = [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            for imp in nested:
                modules = [alias.name for alias in imp.names] if isinstance(imp, ast.Import) else [imp.module or ""]
                offenders += [f"{name}: {m}" for m in modules if m.split(".")[0] in EXTRAS]
    assert offenders == []
