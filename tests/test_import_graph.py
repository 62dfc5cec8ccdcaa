"""The package's layering: no import circle among fcmae's modules, the command layer (fcmae.cli) above everything
else, and `--help` answered without torch or timm.

The graph counts every import a module can run: at the top, inside functions, and under TYPE_CHECKING. It leaves
out only the block under `if __name__ == "__main__":` (it runs when the module is executed as a script, never when
it is imported, so it cannot close a circle: that is how `python -m fcmae.visualize` reaches the command layer).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fcmae"

# Circles allowed, each with its reason: (importer, imported) edges left out of the graph.
ALLOWED = {
    # The encoder dispatches its "minkowski" backends to fcmae.minkowski, imported only when such a backend runs
    # (MinkowskiEngine is optional); fcmae.minkowski builds its layers from the encoder's blocks.
    ("fcmae.encoder", "fcmae.minkowski"): "backend dispatch",
}


def module_files() -> dict[str, Path]:
    """Module name -> file, for every module of the package (a package is named by its __init__.py)."""
    out = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if __name__ == "__main__":`."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"':
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the fcmae modules it imports. `from .pkg import name` counts as importing `pkg.name` when that is a
    module, else `pkg` (whose __init__ then provides the name)."""
    files = module_files()

    def nearest(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, file in files.items():
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                edges.update(nearest(a.name) for a in node.names if a.name.split(".")[0] == "fcmae")
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fcmae":
                continue
            for alias in node.names:
                edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else nearest(target))
        edges.discard(None)
        edges.discard(module)
        graph[module] = {e for e in edges if (module, e) not in ALLOWED}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_lazy_imports():
    """The parser finds imports inside functions, or the test below could pass on a circle made of them."""
    tree = ast.parse("def f():\n    from .b import c\nif __name__ == '__main__':\n    import fcmae.cli\n")
    assert [n.module for n in _imports(tree)] == ["b"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    graph = import_graph()
    assert "fcmae.cli" in graph and "fcmae.convert.conversion" in graph  # the graph is the package's
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(
        " <-> ".join(c) + "\n  " + "\n  ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found)


def test_library_modules_import_no_command_code():
    """Nothing below fcmae.cli imports it. A package's __main__.py (`python -m fcmae.convert`) is a command's entry
    point like the scripts, run and never imported: it may."""
    graph = import_graph()
    library = {m: edges for m, edges in graph.items()
               if not (m == "fcmae.cli" or m.startswith("fcmae.cli.") or m.endswith(".__main__"))}
    upward = {m: sorted(e for e in edges if e == "fcmae.cli" or e.startswith("fcmae.cli.")) for m, edges in library.items()}
    assert "fcmae.convert" in library and "fcmae.cli.convert" in graph["fcmae.convert.__main__"]  # the test sees it
    assert not {m: e for m, e in upward.items() if e}


def _fresh_modules(code: str) -> list[str]:
    """The modules loaded after running `code` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_import_fcmae_loads_no_command_or_export_code():
    loaded = _fresh_modules("import fcmae")
    assert not [m for m in loaded if m.startswith(("fcmae.cli", "fcmae.exports"))]
    assert "torch" not in loaded  # the model classes import on first use (fcmae.FCMAE)


def test_library_modules_load_no_command_layer():
    """Each library module, imported alone in a fresh interpreter, loads nothing of fcmae.cli (one interpreter for
    all: a module whose import loads the command layer is named by the first import that does)."""
    library = [m for m in module_files() if not m.startswith("fcmae.cli") and not m.endswith("__main__")]
    code = ("import importlib, sys, json\nbad = {}\n"
            f"for name in {library!r}:\n"
            "    before = set(sys.modules)\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError as e:  # an optional dependency (MinkowskiEngine, transformers) is absent\n"
            "        continue\n"
            "    cli = [m for m in set(sys.modules) - before if m.startswith('fcmae.cli')]\n"
            "    if cli:\n"
            "        bad[name] = sorted(cli)\n"
            "        for m in cli: del sys.modules[m]\n"
            "print(json.dumps(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == {}


@pytest.mark.parametrize("command", [["pretrain.py"], ["finetune.py"], ["-m", "fcmae.convert"], ["-m", "fcmae.visualize"],
                                     ["-c", "import sys; from fcmae.cli.stats import main; sys.exit(main())"],  # fcmae-stats
                                     ["-c", "import sys; from fcmae.cli.shards import main; sys.exit(main())"],  # fcmae-shards
                                     ["-m", "fcmae.data.stats"], ["-m", "fcmae.data.shard_writer"]])
def test_help_imports_neither_torch_nor_timm(command):
    """`--help` is answered from the config classes: torch and timm are not imported (issue 24 item 20). `-X
    importtime` lists every module the process imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "fcmae" in imported  # the listing works
    assert not imported & {"torch", "timm", "transformers", "accelerate"}


@pytest.mark.parametrize("script, flag", [("pretrain.py", "--mask-ratoi"), ("finetune.py", "--smoothin")])
def test_a_bad_flag_is_answered_before_torch_imports(script, flag):
    """A typo ends with the one-line "did you mean" error and status 2, without waiting for torch and timm."""
    out = subprocess.run([sys.executable, "-X", "importtime", script, flag, "0.1"], capture_output=True, text=True,
                         cwd=ROOT)
    errors = [line for line in out.stderr.splitlines() if not line.startswith("import time:")]
    assert out.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"error: unknown flag {flag}"), errors
    assert "did you mean" in errors[0]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "timm"}



def _fcmae_paths(tree: ast.AST) -> set[str]:
    """Every dotted path into the package a file names: `from fcmae.x import y` (fcmae.x.y), `import fcmae.x`, and
    attribute chains read from the name fcmae (`fcmae.config.model.resolve_name`)."""
    paths = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "fcmae":
            paths.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Import):
            paths.update(a.name for a in node.names if a.name.split(".")[0] == "fcmae")
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            parts = []
            while isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id == "fcmae":
                paths.add(".".join(["fcmae", *reversed(parts)]))
    return paths


def test_code_outside_the_package_names_only_what_exists():
    """The scripts, benchmarks and tests reach the package by dotted paths (`from fcmae.config.model import ...`,
    `fcmae.config.model.resolve_name`). A module renamed without them (fcmae.model_config -> fcmae.config.model)
    is found here, not when a benchmark next runs. Each path is resolved in one fresh interpreter: imported where
    it is a module, read as an attribute (the packages' lazy exports included) where it is not."""
    users = [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "scripts").rglob("*.py"),
             *(ROOT / "tests").glob("*.py")]
    paths = sorted(set().union(*(_fcmae_paths(ast.parse(f.read_text(), str(f))) for f in users)))
    code = ("import importlib, json, sys\n"
            "missing = []\n"
            "for path in json.loads(sys.argv[1]):\n"
            "    parts = path.split('.')\n"
            "    obj, i = importlib.import_module('fcmae'), 1\n"
            "    while i < len(parts):\n"
            "        try:\n"
            "            obj = importlib.import_module('.'.join(parts[:i + 1]))\n"
            "        except ModuleNotFoundError as e:\n"
            "            if e.name != '.'.join(parts[:i + 1]):\n"
            "                break  # an optional dependency (MinkowskiEngine) of a module that exists\n"
            "            if not hasattr(obj, parts[i]):\n"
            "                missing.append(path)\n"
            "                break\n"
            "            obj = getattr(obj, parts[i])\n"
            "            if not isinstance(obj, type(importlib)):\n"
            "                break  # a class or function: what follows are its own attributes\n"
            "        i += 1\n"
            "print(json.dumps(missing))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(paths)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(paths) > 50 and json.loads(out.stdout.splitlines()[-1]) == []
