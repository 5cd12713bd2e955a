"""Where the config trees live: at the top of the checkout (the project is installed editable).

Absolute paths keep Hydra from looking for a Python package named `conf`. The mapping
commands (predict, evaluate, export) have their own root, `conf/commands`, linking in only the
`data` and `tracking` groups: there `model=` names a model to load, and must not be taken for
the training `model` group.
"""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
COMMANDS_CONFIG_DIR = str(Path(CONFIG_DIR) / "commands")
