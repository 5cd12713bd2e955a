"""Mapping jobs: resumable, fault-tolerant, one record per job, the same maps on any engine."""

from __future__ import annotations

import csv
import ctypes
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import numpy as np
import pytest
import rasterio
import torch
from mlflow.tracking import MlflowClient
from rasterio.transform import from_origin

from tests.conftest import write_raster

BIN = Path(sys.executable).parent
MODEL = Path(__file__).parent / "fixtures" / "pre_refactor" / "checkpoint.pt"  # 1.3 MB, 4 classes


def tiles(folder: Path, count: int, size: int = 96, seed: int = 0) -> list[Path]:
    """`count` 4-band rasters side by side on one UTM grid (a 4-wide row-major block)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        row, col = divmod(index, 4)
        transform = from_origin(400000 + col * size, 4300000 - row * size, 1, 1)
        image = rng.integers(0, 255, (4, size, size), dtype=np.uint8)
        paths.append(write_raster(folder / f"tile_{index:02d}.tif", image, transform=transform))
    return paths


def corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def job_command(tmp: Path, inputs: str, output: Path, *extra: str, model: Path = MODEL):
    """`landcover-predict` over `inputs` into the job folder `output`, small tiles, one thread."""
    return [
        str(BIN / "landcover-predict"),
        f"model={model}",
        f"input={inputs}",
        f"output={output}/",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "predict.tile_size=64",
        "predict.overlap=16",
        "predict.progress=false",
        "quicklook_size=64",
        "engine.threads=1",
        *extra,
    ]


def job(tmp: Path, inputs: str, output: Path, *extra: str, timeout: int = 300):
    return subprocess.run(
        job_command(tmp, inputs, output, *extra),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def manifest(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "manifest.csv").open() as handle:
        return {Path(row["input"]).name: row for row in csv.DictReader(handle)}


def read_maps(folder: Path) -> dict[str, np.ndarray]:
    maps = {}
    for path in sorted(folder.glob("*_landcover.tif")):
        with rasterio.open(path) as src:
            maps[path.name] = src.read(1)
    return maps


def test_a_corrupt_input_fails_alone_and_a_rerun_maps_only_it(tmp_path):
    paths = tiles(tmp_path / "in", 12)
    corrupt(paths[5])
    out = tmp_path / "maps"
    first = job(tmp_path, f"{tmp_path}/in/*.tif", out)
    assert first.returncode == 1, first.stderr
    assert "1 of 12 inputs failed" in first.stderr and "tile_05.tif" in first.stderr
    rows = manifest(out)
    assert [n for n, r in rows.items() if r["status"] == "failed"] == ["tile_05.tif"]
    assert sum(r["status"] == "done" for r in rows.values()) == 11
    assert rows["tile_05.tif"]["error"] and rows["tile_05.tif"]["attempts"] == "2"  # retries=1
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*_landcover.tif")}
    assert len(kept) == 11 and not list(out.glob(".landcover-*"))  # nothing half-written

    tiles(tmp_path / "fixed", 12)[5].replace(paths[5])  # the same grid, a readable file
    second = job(tmp_path, f"{tmp_path}/in/*.tif", out)
    assert second.returncode == 0, second.stderr
    assert "11 of 12 inputs already mapped: skipped" in second.stdout + second.stderr
    assert all(r["status"] == "done" for r in manifest(out).values())
    assert {
        p.name: p.stat().st_mtime_ns for p in out.glob("*_landcover.tif") if p.name in kept
    } == kept
    with rasterio.open(out / "mosaic.vrt") as mosaic:
        assert (mosaic.width, mosaic.height) == (4 * 96, 3 * 96)
        whole = mosaic.read(1)
    assert (whole != 255).all() and set(np.unique(whole)) <= {1, 2, 3, 4}
    totals = json.loads((out / "area_totals.json").read_text())
    (crs,) = totals
    assert sum(row["pixels"] for row in totals[crs]) == 12 * 96 * 96
    assert sum(row["area_m2"] for row in totals[crs]) == pytest.approx(12 * 96 * 96)
    assert (out / "mosaic.png").stat().st_size > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("predictions").experiment_id])
    assert len(runs) == 2  # one per job, not one per map
    last = max(runs, key=lambda r: r.info.start_time)
    assert last.data.metrics["mapped"] == 1 and last.data.metrics["skipped"] == 11
    logged = {a.path for a in client.list_artifacts(last.info.run_id, "region")}
    assert logged >= {
        "region/manifest.csv",
        "region/area_totals.csv",
        "region/mosaic_overview.tif",
        "region/mosaic_overview.tif.aux.xml",
        "region/mosaic_overview.qml",
        "region/mosaic.png",
    }
    assert "region/mosaic.vrt" not in logged  # it names maps the run does not hold
    downloaded = mlflow.artifacts.download_artifacts(
        f"runs:/{last.info.run_id}/region/mosaic_overview.tif",
        dst_path=str(tmp_path / "down"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    with rasterio.open(downloaded) as alone, rasterio.open(out / "mosaic.vrt") as mosaic:
        assert alone.bounds == pytest.approx(mosaic.bounds) and alone.crs == mosaic.crs


def test_a_killed_job_resumes_to_the_same_maps_as_one_shot(tmp_path):
    tiles(tmp_path / "in", 12, size=160)
    inputs = f"{tmp_path}/in/*.tif"
    whole = tmp_path / "whole"
    assert job(tmp_path, inputs, whole, "log_to_mlflow=false").returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        job_command(tmp_path, inputs, killed, "log_to_mlflow=false"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (killed / "manifest.csv").exists() and sum(
            r["status"] == "done" for r in manifest(killed).values()
        ) >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = sum(r["status"] == "done" for r in manifest(killed).values())
    assert 4 <= done_before < 12, "the job was not killed half-way"
    again = job(tmp_path, inputs, killed, "log_to_mlflow=false")
    assert again.returncode == 0, again.stderr
    assert f"{done_before} of 12 inputs already mapped" in again.stdout + again.stderr
    assert not list(killed.glob(".landcover-*"))  # the killed job's staging was removed
    one_shot, resumed = read_maps(whole), read_maps(killed)
    assert sorted(one_shot) == sorted(resumed) and len(one_shot) == 12
    for name, pixels in one_shot.items():
        np.testing.assert_array_equal(pixels, resumed[name])


@pytest.mark.slow  # starts a local Ray
def test_ray_engine_maps_pixel_for_pixel_like_local_in_one_run(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    tiles(tmp_path / "in", 4)
    inputs = f"{tmp_path}/in/*.tif"
    local = job(tmp_path, inputs, tmp_path / "local", "tracking.experiment=local")
    assert local.returncode == 0, local.stderr
    distributed = job(
        tmp_path,
        inputs,
        tmp_path / "ray",
        "engine.name=ray",
        "engine.workers=2",
        "tracking.experiment=ray",
        timeout=600,
    )
    assert distributed.returncode == 0, distributed.stderr
    a, b = read_maps(tmp_path / "local"), read_maps(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 4
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ray").experiment_id])
    assert run.data.params["engine"] == "ray" and run.data.metrics["mapped"] == 4


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves files with HTTP range requests (what GDAL's /vsicurl/ asks for) and records
    every request, so the test can tell ranges from whole downloads."""

    requests: list[tuple[str, str, str | None]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self.requests.append(("HEAD", self.path, None))
        super().do_HEAD()

    def do_GET(self) -> None:  # noqa: N802
        wanted = self.headers.get("Range")
        self.requests.append(("GET", self.path, wanted))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            start, end = int(first), min(int(last or len(data) - 1), len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            chunk = data[start : end + 1]
        else:
            self.send_response(200)
            chunk = data
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk)


def test_stac_items_over_http_are_read_by_ranges(tmp_path):
    paths = tiles(tmp_path / "served", 2, size=256)
    handler = partial(RangeHandler, directory=str(tmp_path / "served"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        items = {
            "type": "FeatureCollection",
            "features": [
                {
                    "type": "Feature",
                    "stac_version": "1.0.0",
                    "id": path.stem,
                    "geometry": None,
                    "properties": {"datetime": "2018-06-01T00:00:00Z"},
                    "links": [],
                    "assets": {
                        "thumbnail": {"href": f"{base}/none.png", "roles": ["thumbnail"]},
                        "image": {"href": f"{base}/{path.name}", "roles": ["data"]},
                    },
                }
                for path in paths
            ],
        }
        (tmp_path / "items.json").write_text(json.dumps(items))
        remote = job(tmp_path, f"{tmp_path}/items.json", tmp_path / "remote", "log_to_mlflow=false")
    finally:
        server.shutdown()
    assert remote.returncode == 0, remote.stderr
    local = job(tmp_path, f"{tmp_path}/served/*.tif", tmp_path / "local", "log_to_mlflow=false")
    assert local.returncode == 0, local.stderr
    a, b = read_maps(tmp_path / "remote"), read_maps(tmp_path / "local")
    assert sorted(a) == sorted(b) == ["tile_00_landcover.tif", "tile_01_landcover.tif"]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    gets = [(path, wanted) for method, path, wanted in RangeHandler.requests if method == "GET"]
    assert {path for path, _ in gets} == {"/tile_00.tif", "/tile_01.tif"}  # no sidecar probing
    assert all(wanted is not None for _, wanted in gets), f"a whole file was downloaded: {gets}"


def gdal_category_names(path: Path) -> list[str]:
    """What GDAL itself reports as the band's categories (`gdalinfo`'s "Categories:")."""
    import rasterio as rio

    library = glob.glob(str(Path(rio.__file__).parent.parent / "rasterio.libs" / "libgdal-*"))
    if not library:
        pytest.skip("rasterio's wheel has no bundled libgdal to ask")
    gdal = ctypes.CDLL(library[0])
    gdal.GDALOpen.restype = ctypes.c_void_p
    gdal.GDALGetRasterBand.restype = ctypes.c_void_p
    gdal.GDALGetRasterBand.argtypes = [ctypes.c_void_p, ctypes.c_int]
    gdal.GDALGetRasterCategoryNames.restype = ctypes.POINTER(ctypes.c_char_p)
    gdal.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    gdal.GDALClose.argtypes = [ctypes.c_void_p]
    gdal.GDALGetMetadata.restype = ctypes.c_void_p
    gdal.GDALGetMetadata.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    gdal.GDALAllRegister()
    dataset = gdal.GDALOpen(str(path).encode(), 0)
    assert dataset, f"GDAL could not open {path}"
    try:
        band = gdal.GDALGetRasterBand(dataset, 1)
        gdal.GDALGetMetadata(band, None)  # as gdalinfo does first: GTiff loads the .aux.xml here
        names = gdal.GDALGetRasterCategoryNames(band)
        found = []
        index = 0
        while names and names[index] is not None:
            found.append(names[index].decode())
            index += 1
        return found
    finally:
        gdal.GDALClose(dataset)


def test_gdal_lists_the_class_names_of_a_map_and_of_the_mosaic(tmp_path):
    tiles(tmp_path / "in", 2)
    out = tmp_path / "maps"
    assert job(tmp_path, f"{tmp_path}/in/*.tif", out, "log_to_mlflow=false").returncode == 0
    checkpoint = torch.load(MODEL, weights_only=True)
    expected = {c["codes"][0]: c["name"] for c in checkpoint["metadata"]["schema"]["classes"]}
    for path in (out / "tile_00_landcover.tif", out / "mosaic.vrt"):
        names = gdal_category_names(path)
        assert {code: names[code] for code in expected} == expected, path


def test_an_input_far_from_the_training_pixel_size_is_flagged(tmp_path):
    state = torch.load(MODEL, weights_only=True)
    state["metadata"]["pixel_size"] = 1.0
    model = tmp_path / "one_metre.pt"
    torch.save(state, model)
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    coarse = write_raster(
        tmp_path / "in" / "coarse.tif",
        rng.integers(0, 255, (4, 64, 64), dtype=np.uint8),
        transform=from_origin(400000, 4300000, 23, 23),
    )
    fine = write_raster(
        tmp_path / "in" / "fine.tif",
        rng.integers(0, 255, (4, 64, 64), dtype=np.uint8),
        transform=from_origin(400000, 4300000, 1.5, 1.5),
    )
    assert coarse and fine
    out = tmp_path / "maps"
    done = subprocess.run(
        job_command(tmp_path, f"{tmp_path}/in/*.tif", out, "log_to_mlflow=false", model=model),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = manifest(out)
    assert (
        "pixel size 23 differs from the model's training pixel size 1 by 23.0x"
        in (rows["coarse.tif"]["warning"])
    )
    assert rows["fine.tif"]["warning"] == ""
    assert "coarse.tif: pixel size 23" in done.stdout + done.stderr


def test_a_second_job_on_the_same_folder_is_refused(tmp_path):
    from landcover.errors import LandcoverError
    from landcover.mapping.manifest import job_lock

    refused = pytest.raises(LandcoverError, match="another mapping job")
    with job_lock(tmp_path), refused, job_lock(tmp_path):
        pass
    with job_lock(tmp_path):  # released: free again
        pass
    assert os.path.exists(tmp_path / ".job.lock")


def test_an_unknown_engine_is_refused_before_any_work(tmp_path):
    from landcover.errors import ConfigError
    from landcover.mapping.job import run_predictions
    from tests.conftest import compose_config

    cfg = compose_config(
        "predict",
        f"model={MODEL}",
        "input=nowhere/*.tif",
        f"output={tmp_path}/",
        "engine.name=dask",
    )
    with pytest.raises(ConfigError, match="engine.name='dask' is not local or ray"):
        run_predictions(cfg)
    assert not any(tmp_path.iterdir())  # no manifest, no lock, nothing


def test_the_job_run_spans_the_job_and_describes_it(tmp_path):
    tiles(tmp_path / "in", 3)
    rng = np.random.default_rng(1)
    write_raster(
        tmp_path / "in" / "nowhere.tif", rng.integers(0, 255, (4, 64, 64), dtype=np.uint8), crs=None
    )
    out = job(tmp_path, f"{tmp_path}/in/*.tif", tmp_path / "maps")
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "1 map(s) have no CRS" in said and "no mosaic or quicklook includes them" in said
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("predictions").experiment_id])
    seconds = run.data.metrics["seconds"]
    assert (run.info.end_time - run.info.start_time) / 1000 >= seconds  # the job's own span
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith("Mapping job: 4 mapped, 0 already mapped, 0 failed")
    assert f"model: {MODEL}" in description or "model:" in description


def test_a_job_is_a_stac_collection_of_its_maps(tmp_path):
    """Four maps -> <folder>/stac/: a Collection over the region and an Item per map that
    pystac reads back, each asset a map that exists with the map's own classes and colours,
    its grid (projection), `derived_from` its input and a link to the model."""
    import pystac
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.projection import ProjectionExtension

    from landcover.interop.stac_model_item import validate_core

    paths = tiles(tmp_path / "in", 4)
    done = job(tmp_path, f"{tmp_path}/in/*.tif", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    collection = pystac.Collection.from_file(str(tmp_path / "out" / "stac" / "collection.json"))
    stac = tmp_path / "out" / "stac"
    validate_core(json.loads((stac / "collection.json").read_text()), "collection")
    items = sorted(collection.get_items(), key=lambda item: item.id)
    assert [item.id for item in items] == [f"tile_{i:02d}_landcover" for i in range(4)]
    west, south, east, north = collection.extent.spatial.bboxes[0]
    for item, source in zip(items, paths, strict=True):
        validate_core(json.loads((stac / f"{item.id}.json").read_text()), "item")
        asset = item.assets["map"]
        path = Path(asset.get_absolute_href())
        assert path.is_file() and path.parent == tmp_path / "out"
        with rasterio.open(path) as src:
            colours = src.colormap(1)
            assert ProjectionExtension.ext(item).epsg == src.crs.to_epsg()
            assert ProjectionExtension.ext(item).shape == [src.height, src.width]
        classes = ClassificationExtension.ext(asset).classes
        names = gdal_category_names(path)
        assert [c.name for c in classes] == [n for n in names if n]
        for c in classes:
            assert c.color_hint == "".join(f"{v:02X}" for v in colours[c.value][:3])
        (derived,) = item.get_links("derived_from")
        assert Path(derived.href) == source.resolve()
        assert [link.href for link in item.get_links("via")] == [str(MODEL)]
        left, bottom, right, top = item.bbox
        assert west <= left < right <= east and south <= bottom < top <= north
