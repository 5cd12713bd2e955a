"""The package's import graph, read from the source (function-level imports included, imports
only for type checkers left out): no module may reach itself through its imports.

A loop hidden under lazy imports still ties its modules together: none of them can be read,
tested or moved alone. The upward imports that remain (a lower layer importing a higher one
inside a function) are counted and printed; `docs/architecture.md` explains each.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "landcover"
# the layers, lowest first: a module may import its own layer and those below
LAYERS = [
    ("errors", "paths", "ranks", "atomic", "locks", "reachable", "upgrade"),
    # what a model is made of and how a run is set up
    ("data", "models", "metrics", "predict.prior", "config", "cluster", "training.distributed"),
    ("runtime", "tracking.system_metrics"),
    # a model at rest: references, formats, the one loader
    ("artifacts",),
    # prediction and serving a loaded model
    ("predict", "serving", "interop.onnx"),
    # records
    ("tracking",),
    # training's parts, promotion, jobs over many rasters, evaluation, the correction studio
    ("training", "registry", "mapping", "evaluate", "studio"),
    # the jobs and commands
    (
        "training.train",
        "sweep",
        "interop",
        "registry.promote",
        "registry.champion",
        "serving.server",
        "tracking.team",
        "studio.app",
        "commands",
    ),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere (not under `if TYPE_CHECKING:`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" for alias in node.names] + [source]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "landcover":
                found.add(target)
                break
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = list(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            connect(node)
    return found


def layer_of(module: str) -> int:
    short = module.removeprefix("landcover.")
    best, depth = len(LAYERS), -1
    for number, names in enumerate(LAYERS):
        for name in names:
            if (short == name or short.startswith(f"{name}.")) and len(name) > depth:
                best, depth = number, len(name)
    return best


def test_the_package_has_no_import_loop():
    found = loops(import_graph())
    assert not found, "import loops:\n" + "\n".join(" <-> ".join(group) for group in found)


def test_every_module_has_a_layer_and_upward_imports_are_counted():
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "landcover" and layer_of(m) == len(LAYERS))
    assert not unplaced, f"modules with no layer in tests/test_layout.py: {unplaced}"
    upward = sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )
    print(f"{len(upward)} upward import(s):")
    for module, target in upward:
        print(f"  {module} -> {target}")
    assert len(upward) <= 3, upward  # each one explained in docs/architecture.md


# public functions named load* outside artifacts/ that load something other than a model
NOT_MODEL_LOADERS = {"landcover.data.scenes.load_scenes"}


def test_models_are_loaded_in_one_place():
    """One public loader (`artifacts.load`): a `load*` function anywhere else would be a second
    way in, with its own checks to keep in step."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.startswith("landcover.artifacts"):
            continue
        for node in ast.parse(path.read_text()).body:
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and node.name.startswith("load"):
                found.append(f"{name}.{node.name}")
    model_loaders = sorted(set(found) - NOT_MODEL_LOADERS)
    print(f"public model-loading functions outside artifacts/: {len(model_loaders)}")
    assert model_loaders == []
    assert callable(__import__("landcover.artifacts", fromlist=["load"]).load)


def test_the_type_checker_sees_the_settings_a_job_passes_down(tmp_path):
    """`train_settings` hands typed objects down: a wrong use of `trainer.max_epochs` is a
    type error, not a surprise at epoch 0 (it was `Any` when every signature took DictConfig)."""
    import subprocess
    import sys

    scratch = tmp_path / "wrong_type.py"
    scratch.write_text(
        "from landcover.config import TrainConfig\n\n\n"
        "def epochs_label(settings: TrainConfig) -> str:\n"
        "    return settings.trainer.max_epochs\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(PACKAGE.parent / "pyproject.toml"),
            # config.py itself, its imports skipped: a second, not the 30 s of checking the
            # whole package on a cold cache (`make test` alone runs no `make lint` first)
            "--follow-imports=skip",
            "--no-warn-unused-ignores",
            "--cache-dir",
            str(tmp_path / "mypy_cache"),
            str(scratch),
            str(PACKAGE / "config.py"),
        ],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'Incompatible return value type (got "int", expected "str")' in done.stdout
