import numpy as np
import rasterio

from landcover.data.synthetic import (
    BARREN,
    IMPERVIOUS,
    LOW_VEGETATION,
    ROAD,
    TREES,
    WATER,
    SyntheticSpec,
    generate,
)


def read(path):
    with rasterio.open(path) as src:
        return src.read(), src.crs, src.transform, src.colormap(1) if src.count == 1 else None


def test_generation_is_deterministic(tmp_path):
    spec = SyntheticSpec(scenes={"train": 1}, size=192, seed=11)
    a = generate(tmp_path / "a", spec)
    b = generate(tmp_path / "b", spec)
    for name in ("synth_000_naip.tif", "synth_000_lc.tif"):
        np.testing.assert_array_equal(read(a / "train" / name)[0], read(b / "train" / name)[0])
    other = generate(tmp_path / "c", SyntheticSpec(scenes={"train": 1}, size=192, seed=12))
    assert not np.array_equal(
        read(a / "train" / "synth_000_lc.tif")[0], read(other / "train" / "synth_000_lc.tif")[0]
    )


def test_scenes_are_georeferenced_with_colour_map(tiny_synthetic):
    image, crs, transform, _ = read(tiny_synthetic / "train" / "synth_000_naip.tif")
    labels, label_crs, label_transform, colormap = read(
        tiny_synthetic / "train" / "synth_000_lc.tif"
    )
    assert image.shape == (4, 160, 160) and image.dtype == np.uint8
    assert crs.to_epsg() == 26918 and label_crs == crs
    assert transform == label_transform and transform.a == 1.0
    assert colormap[WATER][:3] == (0, 0, 255)


def test_landscape_has_all_classes_and_naip_like_spectra(tmp_path):
    root = generate(tmp_path, SyntheticSpec(scenes={"train": 1}, size=768, seed=0))
    image = read(root / "train" / "synth_000_naip.tif")[0].astype(float)
    labels = read(root / "train" / "synth_000_lc.tif")[0][0]
    assert set(np.unique(labels)) == {WATER, TREES, LOW_VEGETATION, BARREN, IMPERVIOUS, ROAD}
    red, nir = image[0], image[3]
    ndvi = (nir - red) / (nir + red + 1e-6)
    assert nir[labels == WATER].mean() < 40  # water is dark in NIR
    assert ndvi[labels == TREES].mean() > 0.3  # vegetation is bright in NIR
    assert ndvi[labels == IMPERVIOUS].mean() < ndvi[labels == LOW_VEGETATION].mean() - 0.2
    # spatially coherent: most pixels share their right neighbour's class
    assert (labels[:, 1:] == labels[:, :-1]).mean() > 0.95


def test_unchanged_spec_is_not_regenerated(tmp_path):
    spec = SyntheticSpec(scenes={"train": 1}, size=64, seed=0)
    generate(tmp_path, spec)
    target = tmp_path / "train" / "synth_000_naip.tif"
    stamp = target.stat().st_mtime_ns
    generate(tmp_path, spec)
    assert target.stat().st_mtime_ns == stamp


def test_concurrent_generation_is_serialised(tmp_path):
    """Two processes asking at once (two sweep workers' first trials) both get the finished
    dataset; neither sees the other's half-written or deleted files."""
    import multiprocessing as mp

    spec = SyntheticSpec(scenes={"train": 2, "val": 1}, size=96, seed=5)
    context = mp.get_context("fork")
    workers = [context.Process(target=generate, args=(tmp_path, spec)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert len(list((tmp_path / "train").glob("*_naip.tif"))) == 2
    assert len(list((tmp_path / "val").glob("*_lc.tif"))) == 1
    assert (tmp_path / "synthetic.json").exists()
