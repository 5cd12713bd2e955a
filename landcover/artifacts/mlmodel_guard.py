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

import reprlib
from pathlib import Path
from typing import Any

import yaml

from landcover.errors import LandcoverError

FLAVOR = "landcover"
LOADER = "landcover.serving"
ALLOWED_FLAVORS = {FLAVOR, "python_function"}
MAX_MLMODEL_BYTES = 256 * 1024  # a logged model's MLmodel is a few KB
_EXCERPT = reprlib.Repr()  # keyword arguments only from Python 3.12
_EXCERPT.maxlevel, _EXCERPT.maxstring, _EXCERPT.maxother = 2, 60, 60
_EXCERPT.maxlist = _EXCERPT.maxdict = 4


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
    document = read_mlmodel(path)
    flavors = document.get("flavors")
    if not require_flavor and not (isinstance(flavors, dict) and FLAVOR in flavors):
        return
    problems = foreign_parts(document)
    if problems:
        raise ForeignModelError(
            f"{path}: refused before loading: {'; '.join(problems)} (a landcover model names "
            f"flavour {FLAVOR!r} and loader_module {LOADER!r}, with no code path)"
        )


def read_mlmodel(path: Path) -> dict[str, Any]:
    """The MLmodel document, read within bounds: at most MAX_MLMODEL_BYTES, UTF-8, and no YAML
    aliases. An alias lets 2 KB stand for billions of nodes ("billion laughs"): the parser
    shares them, but anything that walks the document (a message quoting it, MLflow's own
    reading) expands them. MLflow never writes aliases, so a file with one is refused whole."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MLMODEL_BYTES + 1)
    except OSError as err:
        raise ForeignModelError(f"{path}: not a readable MLmodel ({err.strerror})") from err
    if len(raw) > MAX_MLMODEL_BYTES:
        raise ForeignModelError(
            f"{path}: over {MAX_MLMODEL_BYTES // 1024} KiB, not an MLmodel MLflow wrote "
            "(those are a few KB)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ForeignModelError(
            f"{path}: not UTF-8 text (byte {err.start}); MLflow writes MLmodel files in UTF-8"
        ) from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ForeignModelError(
                    f"{path}: holds YAML anchors or aliases, which MLflow never writes "
                    "(they can make a small file expand without bound): refused"
                )
        document = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ForeignModelError(f"{path}: not a readable MLmodel ({first})") from None
    return document if isinstance(document, dict) else {}


def excerpt(value: Any) -> str:
    """A value of an untrusted document quoted within bounds (a message stays one line)."""
    return _EXCERPT.repr(value)


def foreign_parts(document: dict[str, Any]) -> list[str]:
    """Each thing in an MLmodel document that is not this project's, one line each."""
    flavors = document.get("flavors")
    if not isinstance(flavors, dict) or FLAVOR not in flavors:
        return [
            "it is not a landcover model (no 'landcover' flavour; a model logged by an older "
            "version is converted by landcover-convert-model)"
        ]
    problems = [f"flavour {excerpt(name)}" for name in flavors if name not in ALLOWED_FLAVORS]
    pyfunc = flavors.get("python_function") or {}
    if not isinstance(pyfunc, dict):
        return [*problems, "a python_function flavour that is not a mapping"]
    loader = pyfunc.get("loader_module", LOADER)
    if loader != LOADER:
        problems.append(f"loader_module {excerpt(loader)}")
    for name, flavor in flavors.items():
        if isinstance(flavor, dict) and flavor.get("code"):
            problems.append(f"code path {excerpt(flavor['code'])} in flavour {excerpt(name)}")
    for key in ("code", "code_paths"):
        if document.get(key):
            problems.append(f"{key} {excerpt(document[key])}")
    return problems
