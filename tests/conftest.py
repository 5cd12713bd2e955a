"""Shared fixtures: tiny generated scenes, a composed config, and the ../shared locator."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hydra import compose, initialize_config_dir
from rasterio.transform import from_origin

import landcover.config  # noqa: F401  (registers the config schemas with Hydra)
from landcover.data.synthetic import SyntheticSpec, generate
from landcover.paths import COMMANDS_CONFIG_DIR, CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]


RAY_TEST = re.compile(r"(^|[_\[])ray([_\]]|$)")


@pytest.fixture(autouse=True)
def one_local_ray_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """`make test` runs files on several pytest-xdist workers (`--dist loadfile`, so a file's
    module fixtures are built once); tests that start a local Ray take turns across them (two
    local Ray clusters on one machine compete for ports and cores), under a file lock."""
    if not RAY_TEST.search(request.node.name):
        yield
        return
    with local_ray_turn():
        yield


@contextlib.contextmanager
def local_ray_turn() -> Iterator[None]:
    """This process's turn at running a Ray on this machine (a file lock across workers)."""
    with open(Path(tempfile.gettempdir()) / "landcover-tests-local-ray.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that reads ../shared is marked `shared` by the fixture it asks for, not by hand:
    `make test-fast` (-m "not shared") then leaves out every one of them, wherever it lives."""
    for item in items:
        if "shared" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)


def shared_dir() -> Path | None:
    """../shared beside the checkout, or $LANDCOVER_SHARED_DIR."""
    candidate = Path(os.environ.get("LANDCOVER_SHARED_DIR", REPO.parent / "shared"))
    return candidate if (candidate / "data").is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip(
            "../shared (real Chesapeake data) is absent: set LANDCOVER_SHARED_DIR or "
            "place the shared folder beside the checkout"
        )
    return path


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, SyntheticSpec(scenes={"train": 2, "val": 1}, size=160, seed=3))
    return root


def compose_config(name: str, *overrides: str):
    directory = CONFIG_DIR if name == "train" else COMMANDS_CONFIG_DIR
    with initialize_config_dir(config_dir=directory, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def compose_train(*overrides: str):
    return compose_config("train", *overrides)


def write_raster(
    path: Path,
    array: np.ndarray,
    *,
    crs: str | None = "EPSG:26918",
    transform=None,
    colormap: dict | None = None,
) -> Path:
    """Write a small GeoTIFF for error-path tests."""
    array = array if array.ndim == 3 else array[None]
    profile = {
        "driver": "GTiff",
        "count": array.shape[0],
        "height": array.shape[1],
        "width": array.shape[2],
        "dtype": array.dtype.name,
        "transform": transform or from_origin(400000, 4300000, 1, 1),
    }
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
        if colormap:
            dst.write_colormap(1, colormap)
    return path


@pytest.fixture
def scene_pair(tmp_path):
    """A valid 4-band image and label pair with Chesapeake codes."""
    rng = np.random.default_rng(0)
    image = write_raster(tmp_path / "a_naip.tif", rng.integers(0, 255, (4, 64, 64), dtype=np.uint8))
    label = write_raster(tmp_path / "a_lc.tif", rng.integers(1, 7, (64, 64), dtype=np.uint8))
    return image, label


def mount_tmpfs(folder: Path, *options: str) -> None:
    """A tmpfs at `folder` with mount `options` (size=2m, ro ...): a disk that fills or refuses
    writes. Root only: the test is skipped with the reason where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, unmounted after the test."""
    mount = tmp_path / "disk"
    mount_tmpfs(mount, "size=3m")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
