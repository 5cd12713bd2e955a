"""Screenshot MLflow's page of a run (or of a registered model) in headless Chromium.

Starts `mlflow server` on the given store on a free loopback port, drives Debian's `chromium`
at the page through Playwright (`pip install -e '.[screenshots]'`; Debian's browser, nothing
downloaded), switches MLflow's sidebar to "Model training", writes a PNG and stops the server.
For the docs and closing notes; it needs Chromium (`apt-get install chromium`), not part of CI.

    .venv/bin/python analysis/screenshot_run.py --run-id <run id> --out docs/run.png
    .venv/bin/python analysis/screenshot_run.py --model landcover --out docs/model.png
    .venv/bin/python analysis/screenshot_run.py --logged-model m-... --out docs/logged.png
    .venv/bin/python analysis/screenshot_run.py --models-of landcover --out docs/models.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests' server helpers
from tests.local_server import HOST, free_port, mlflow_server_command, running  # noqa: E402

# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# kind of machine refuses (Playwright adds --headless itself).
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def page_path(
    client: MlflowClient,
    run_id: str | None,
    model: str | None,
    logged_model: str | None = None,
    models_of: str | None = None,
) -> str:
    if models_of:  # the experiment's Models list (its logged models)
        experiment = client.get_experiment_by_name(models_of)
        if experiment is None:
            sys.exit(f"error: no experiment named {models_of!r}")
        return f"/#/experiments/{experiment.experiment_id}/models"
    if model:
        return f"/#/models/{model}"
    if logged_model:
        found = client.get_logged_model(logged_model)
        return f"/#/experiments/{found.experiment_id}/models/{logged_model}"
    run = client.get_run(run_id)
    return f"/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def shoot(chromium: str, url: str, out: Path, size: tuple[int, int]) -> None:
    """Open `url` in headless Chromium (driven by Playwright, the system browser), switch
    MLflow 3.17's sidebar to "Model training" (a fresh browser opens on its GenAI side, where
    these runs look like evaluations), let the page settle, and save a PNG."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=list(CHROMIUM_FLAGS))
        page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        # MLflow's page keeps polling (never network-idle): wait for its sidebar instead
        page.goto(url, wait_until="load")
        switch = page.get_by_text("Model training", exact=True)
        switch.first.wait_for(timeout=60_000)
        switch.first.click()
        page.goto(url, wait_until="load")  # the page again, in that view
        page.wait_for_timeout(4000)
        page.screenshot(path=str(out.resolve()))
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run-id")
    target.add_argument("--model", help="a registered model name")
    target.add_argument("--logged-model", help="an MLflow 3 logged model id (m-...)")
    target.add_argument("--models-of", help="an experiment name: its Models list")
    parser.add_argument("--out", type=Path, default=Path("mlflow_page.png"))
    parser.add_argument("--size", default="1600,1000", help="window width,height")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    if not Path(args.chromium).exists():
        sys.exit(f"error: {args.chromium} not found (apt-get install chromium)")

    path = page_path(
        MlflowClient(args.tracking_uri), args.run_id, args.model, args.logged_model, args.models_of
    )
    port = free_port()
    server = mlflow_server_command(args.tracking_uri, port)
    width, height = (int(n) for n in args.size.split(","))
    with tempfile.TemporaryDirectory() as profile:
        log = Path(profile) / "server.log"
        with running(server, f"http://{HOST}:{port}/health", log, {}):
            shoot(args.chromium, f"http://{HOST}:{port}{path}", args.out, (width, height))
    print(f"wrote {args.out} ({path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
