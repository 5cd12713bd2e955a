"""HTTP requests one training run makes against an authenticated MLflow server.

Starts `mlflow server --app-name basic-auth` on loopback (users and runs in SQLite), trains the
tiny U-Net of the tests for 2 epochs on generated scenes as the admin, and counts the requests
in the server's access log, by endpoint. Every request there pays a password check (scrypt,
about 2 s on 2 cores), so the count is what a team pays for records.

    .venv/bin/python experiments/team_requests.py
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests' server helpers
from tests.local_server import (  # noqa: E402
    HOST,
    basic_auth_server_command,
    free_port,
    running,
)

BIN = Path(sys.executable).parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        port = free_port()
        url = f"http://{HOST}:{port}"
        command, server_env = basic_auth_server_command(
            f"sqlite:///{folder / 'mlflow.db'}", f"sqlite:///{folder}/auth.db", port, folder
        )
        log = folder / "server.log"
        with running(command, f"{url}/health", log, server_env):
            before = len(log.read_text().splitlines())
            subprocess.run(
                [
                    str(BIN / "landcover-train"),
                    "data=synthetic",
                    f"data.root={folder / 'data'}",
                    "data.synthetic.scenes={train: 2, val: 1}",
                    "data.synthetic.size=160",
                    "data.patch_size=64",
                    "data.patches_per_epoch=16",
                    "data.batch_size=8",
                    "data.val_tile=96",
                    "model.encoder_depth=3",
                    "model.decoder_channels=[32,16,8]",
                    "trainer.max_epochs=2",
                    "trainer.progress=false",
                    "trainer.num_panels=2",
                    "tracking.system_metrics=false",
                    f"tracking.uri={url}",
                    f"hydra.run.dir={folder / 'run'}",
                ],
                check=True,
                capture_output=True,
                env={
                    **os.environ,
                    "MLFLOW_TRACKING_USERNAME": "admin",
                    "MLFLOW_TRACKING_PASSWORD": "admin-password-1",
                },
            )
            lines = log.read_text().splitlines()[before:]
    requests = [m.group(1) for line in lines if (m := re.search(r'"([A-Z]+ [^ ?"]+)', line))]
    print(f"{len(requests)} HTTP requests for one training run (2 epochs, model logged)")
    for endpoint, count in collections.Counter(requests).most_common(8):
        print(f"  {count:3d}  {endpoint}")


if __name__ == "__main__":
    main()
