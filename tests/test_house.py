"""The house's rules, read from the code: folders that depend only downward, no import cycle,
plugins that only register and delegate, modules and functions that fit on a screen."""

import ast
from pathlib import Path

from lenet_sweep import PROJECT_ROOT

PACKAGES = ("lenet_sweep", "hydra_plugins")
# Each folder (or base module) by its layer: a module imports only from its own layer or below.
LAYERS = {
    "lenet_sweep": 0, "errors": 0, "signals": 0, "speed": 0, "db_files": 0, "process": 0,
    "config": 1, "core": 2, "tracking": 3, "fused": 3, "sweep": 4, "job": 5,
    "cli": 6, "__main__": 6, "bench": 6,
}  # fmt: skip
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 60


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict) -> set[str]:
    """The project modules `path` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else parts[0]]


def test_lenet_sweep_imports_nothing_from_the_plugins():
    for module, imported in _graph().items():
        if module.startswith("lenet_sweep"):
            assert not [m for m in imported if m.startswith("hydra_plugins")], module


def test_folders_depend_only_downward():
    for module, imported in _graph().items():
        if not module.startswith("lenet_sweep"):
            continue
        upward = [m for m in imported if m.startswith("lenet_sweep") and _layer(m) > _layer(module)]
        assert not upward, f"{module} imports {upward} from a layer above"


def test_no_import_cycle():
    graph, state = _graph(), {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if imported.startswith("lenet_sweep") and graph.get(imported) is not None:
                if "." not in imported:
                    continue  # the root package's names (paths) import nothing of ours
                assert state.get(imported) != "open", " -> ".join([*path, module, imported])
                if imported not in state:
                    visit(imported, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_plugins_register_and_delegate():
    for module, path in _modules().items():
        if module.startswith("hydra_plugins"):
            tree = ast.parse(path.read_text())
            classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
            assert len(classes) <= 1, module  # the plugin's own class, nothing else
            for cls in classes:
                for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                    assert fn.end_lineno - fn.lineno < 15, f"{module}.{cls.name}.{fn.name}"


def test_modules_and_functions_fit_on_a_screen():
    for module, path in _modules().items():
        lines = path.read_text().count("\n")
        assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{module}.{node.name}: {length} lines"


def test_few_formatter_exceptions():
    skips = sum(p.read_text().count("fmt: skip") for p in PROJECT_ROOT.rglob("*.py")
                if not {".venv", "outputs", "build", ".devpack"} & set(p.parts))  # fmt: skip
    assert skips <= 30


def test_every_package_ships():
    """pyproject.toml lists the packages: each folder of code, conf/ (mapped into lenet_sweep) and
    the hydra_plugins namespace (listed, or an editable install hides our plugins from Hydra)."""
    import tomllib

    settings = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    files = [p for package in PACKAGES for p in (PROJECT_ROOT / package).rglob("*.py")]
    folders = {".".join(p.parent.relative_to(PROJECT_ROOT).parts) for p in files}
    assert set(settings["packages"]) == folders | {"lenet_sweep.conf", "hydra_plugins"}
    assert settings["package-dir"] == {"lenet_sweep.conf": "conf"}


def test_the_generic_sweeper_imports_nothing_of_the_app():
    """sweep/ is the sweeper any Hydra app uses: none of this app's run config, training or
    tracking; the app's additions plug in at sweep/app.py's SweepApp."""
    allowed = ("lenet_sweep.sweep", "lenet_sweep.config.knobs", "lenet_sweep.config.plugins")
    allowed += ("lenet_sweep.db_files", "lenet_sweep.errors", "lenet_sweep.process")
    allowed += ("lenet_sweep.signals",)
    for module, imported in _graph().items():
        if module.startswith("lenet_sweep.sweep"):
            ours = [m for m in imported if m.startswith("lenet_sweep.")]
            assert all(m.startswith(allowed) for m in ours), (module, ours)
