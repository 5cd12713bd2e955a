"""What an MLmodel file may ask to run: this project's flavour and loader, nothing else.

MLflow's pyfunc loader imports the `loader_module` an MLmodel names, after putting its `code`
folder on `sys.path`: a logged model edited to name another module runs that module's code
when `landcover-serve` (or `mlflow.pyfunc.load_model`) loads it. Every path of ours that reads
a logged model checks the MLmodel first, before anything is imported, and refuses one that
names another flavour, another loader, or code. (`mlflow models serve` given such a model by
hand would still run it: that is MLflow's loader, not ours; serve through `landcover-serve`.)
Torch-free, so the serving command checks before it starts anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from landcover.errors import LandcoverError

FLAVOR = "landcover"
LOADER = "landcover.serving"
ALLOWED_FLAVORS = {FLAVOR, "python_function"}


class ForeignModelError(LandcoverError):
    """A logged model whose MLmodel asks MLflow to run code that is not this project's."""


def check_mlmodel(directory: str | Path, require_flavor: bool = False) -> None:
    """Refuse the model in `directory` if it is a landcover model whose MLmodel also names
    another flavour, loader or a code path. Models without our flavour (older pickled ones)
    are left to the loaders, which refuse them with the command that converts them, unless
    `require_flavor` (the serving command, which hands the model to MLflow's loader)."""
    path = Path(directory) / "MLmodel"
    if not path.is_file():
        return
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ForeignModelError(f"{path}: not a readable MLmodel ({err})") from err
    document = document if isinstance(document, dict) else {}
    flavors = document.get("flavors")
    if not require_flavor and not (isinstance(flavors, dict) and FLAVOR in flavors):
        return
    problems = foreign_parts(document)
    if problems:
        raise ForeignModelError(
            f"{path}: refused before loading: {'; '.join(problems)} (a landcover model names "
            f"flavour {FLAVOR!r} and loader_module {LOADER!r}, with no code path)"
        )


def foreign_parts(document: dict[str, Any]) -> list[str]:
    """Each thing in an MLmodel document that is not this project's, one line each."""
    flavors = document.get("flavors")
    if not isinstance(flavors, dict) or FLAVOR not in flavors:
        return [
            "it is not a landcover model (no 'landcover' flavour; a model logged by an older "
            "version is converted by landcover-convert-model)"
        ]
    problems = [f"flavour {name!r}" for name in flavors if name not in ALLOWED_FLAVORS]
    pyfunc = flavors.get("python_function") or {}
    if not isinstance(pyfunc, dict):
        return [*problems, "a python_function flavour that is not a mapping"]
    loader = pyfunc.get("loader_module", LOADER)
    if loader != LOADER:
        problems.append(f"loader_module {loader!r}")
    for name, flavor in flavors.items():
        if isinstance(flavor, dict) and flavor.get("code"):
            problems.append(f"code path {flavor['code']!r} in flavour {name!r}")
    for key in ("code", "code_paths"):
        if document.get(key):
            problems.append(f"{key} {document[key]!r}")
    return problems
