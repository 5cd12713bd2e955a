"""Bad input: each error names the file and the problem."""

import numpy as np
import pytest
from rasterio.transform import from_origin

from landcover.data.scenes import dataset_fingerprint, find_pairs, validate_scene
from landcover.data.schema import ClassSchema
from landcover.errors import SceneError
from tests.conftest import compose_train, write_raster


@pytest.fixture(scope="module")
def schema() -> ClassSchema:
    return ClassSchema.from_config(compose_train().data.schema)


def check(image, label, schema, bands=4):
    return validate_scene(str(image), str(label), bands=bands, schema=schema)


def test_valid_pair(scene_pair, schema):
    image, label = scene_pair
    scene = check(image, label, schema)
    assert (scene.width, scene.height) == (64, 64)
    assert scene.crs == "EPSG:26918"


def test_raster_without_crs_is_accepted(tmp_path, schema):
    image = write_raster(tmp_path / "i.tif", np.ones((4, 8, 8), np.uint8), crs=None)
    label = write_raster(tmp_path / "l.tif", np.ones((8, 8), np.uint8), crs=None)
    assert check(image, label, schema).crs is None


def test_size_mismatch_names_both_files(tmp_path, scene_pair, schema):
    image, _ = scene_pair
    label = write_raster(tmp_path / "small_lc.tif", np.ones((32, 64), np.uint8))
    with pytest.raises(SceneError, match="grid mismatch") as err:
        check(image, label, schema)
    assert str(image) in str(err.value) and str(label) in str(err.value)
    assert "64x64" in str(err.value) and "64x32" in str(err.value)


def test_crs_mismatch_names_both_crs(tmp_path, scene_pair, schema):
    image, _ = scene_pair
    label = write_raster(tmp_path / "utm17_lc.tif", np.ones((64, 64), np.uint8), crs="EPSG:26917")
    with pytest.raises(SceneError, match="CRS mismatch") as err:
        check(image, label, schema)
    assert "EPSG:26918" in str(err.value) and "EPSG:26917" in str(err.value)
    assert str(label) in str(err.value)


def test_transform_mismatch(tmp_path, scene_pair, schema):
    image, _ = scene_pair
    label = write_raster(
        tmp_path / "shifted_lc.tif",
        np.ones((64, 64), np.uint8),
        transform=from_origin(400010, 4300000, 1, 1),
    )
    with pytest.raises(SceneError, match="transform mismatch") as err:
        check(image, label, schema)
    assert str(label) in str(err.value)


def test_wrong_band_count(tmp_path, scene_pair, schema):
    _, label = scene_pair
    image = write_raster(tmp_path / "rgb.tif", np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(SceneError, match="has 3 band") as err:
        check(image, label, schema)
    assert str(image) in str(err.value) and "expects 4" in str(err.value)


def test_unknown_label_codes_are_listed(tmp_path, scene_pair, schema):
    image, _ = scene_pair
    codes = np.ones((64, 64), np.uint8)
    codes[0, :3] = [9, 42, 9]
    label = write_raster(tmp_path / "odd_lc.tif", codes)
    with pytest.raises(SceneError, match=r"label codes \[9, 42\]") as err:
        check(image, label, schema)
    assert str(label) in str(err.value) and "chesapeake_4class" in str(err.value)


def test_missing_label_file(tmp_path, scene_pair, schema):
    image, _ = scene_pair
    with pytest.raises(SceneError, match="label file .* does not exist") as err:
        check(image, tmp_path / "nothing_lc.tif", schema)
    assert str(image) in str(err.value)


def test_missing_image_file(tmp_path, scene_pair, schema):
    _, label = scene_pair
    with pytest.raises(SceneError, match="does not exist"):
        check(tmp_path / "ghost.tif", label, schema)


def test_corrupt_file(tmp_path, scene_pair, schema):
    _, label = scene_pair
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff" * 100)
    with pytest.raises(SceneError, match="not a readable raster") as err:
        check(junk, label, schema)
    assert str(junk) in str(err.value)


def test_truncated_file(tmp_path, scene_pair, schema):
    image, label = scene_pair
    rng = np.random.default_rng(1)
    big = write_raster(tmp_path / "big.tif", rng.integers(0, 255, (4, 64, 64), dtype=np.uint8))
    data = big.read_bytes()
    truncated = tmp_path / "truncated.tif"
    # keep the header and directory (written first by GDAL's default layout) but cut the pixels
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SceneError) as err:
        check(truncated, label, schema)
    assert str(truncated) in str(err.value)
    assert "corrupt or truncated" in str(err.value) or "not a readable raster" in str(err.value)


def test_find_pairs_by_pattern_and_manifest(tmp_path, scene_pair):
    image, label = scene_pair
    pairs = find_pairs(
        pattern=str(tmp_path / "*_naip.tif"),
        manifest=None,
        image_suffix="_naip.tif",
        label_suffix="_lc.tif",
    )
    assert pairs == [(str(image), str(label))]
    manifest = tmp_path / "train.csv"
    manifest.write_text("image,label\na_naip.tif,a_lc.tif\n")
    assert find_pairs(pattern=None, manifest=str(manifest), image_suffix="x", label_suffix="y") == [
        (str(image), str(label))
    ]


def test_fingerprint_changes_with_files(tmp_path, scene_pair, schema):
    image, label = scene_pair
    scene = check(image, label, schema)
    before = dataset_fingerprint([scene])
    write_raster(label, np.ones((64, 64), np.uint8))  # rewrite: different size on disk
    assert dataset_fingerprint([check(image, label, schema)]) != before
