"""The picture in docs/studio.md: the studio on a real val patch with the imported 2018 network
and the patch's labels, its suggestions of where to label next drawn, `N` pressed once.
Headless Chromium (Debian's) through Playwright, as the page tests drive it.

    .venv/bin/python experiments/studio_suggestions_picture.py docs/images/studio_suggestions.png \\
        [--image ../shared/data/chesapeake-sample/val/m_3708035_ne_17_1-2_naip-old.tif] \\
        [--model ../shared/models/seed-cntk/250epochs.model]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PATCH = SHARED / "data/chesapeake-sample/val/m_3708035_ne_17_1-2_naip-old.tif"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--image", type=Path, default=PATCH)
    parser.add_argument("--model", default=str(SHARED / "models/seed-cntk/250epochs.model"))
    args = parser.parse_args()
    labels = Path(str(args.image).replace("_naip-old", "_lc").replace("_naip-new", "_lc"))
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        command = [
            str(Path(sys.executable).parent / "landcover-studio"), str(args.image),
            "--model", args.model, "--labels", str(labels), "--port", str(port),
            "--session", f"{tmp}/session", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db",
        ]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.5)
            url = json.loads((Path(tmp) / "session" / ".studio.json").read_text())["url"]
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path="/usr/bin/chromium", args=["--no-sandbox"]
                )
                page = browser.new_page(viewport={"width": 1200, "height": 780})
                page.goto(url)
                page.wait_for_selector("body[data-ready='1']", timeout=120_000)
                page.evaluate("() => document.activeElement.blur()")
                page.keyboard.press("n")
                page.wait_for_selector("body[data-suggestion-at='0']", timeout=10_000)
                page.evaluate("() => studio.fit()")  # the whole patch, every circle in view
                page.wait_for_load_state("networkidle")
                time.sleep(1.0)
                page.screenshot(path=str(args.output))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
