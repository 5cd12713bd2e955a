import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from landcover.data.reader import SceneReader
from landcover.data.sampling import GridPatchDataset, RandomPatchDataset, RareClassSampling
from landcover.data.scenes import find_pairs, load_scenes
from landcover.data.schema import IGNORE_INDEX, ClassSchema
from tests.conftest import compose_train


@pytest.fixture(scope="module")
def schema():
    return ClassSchema.from_config(compose_train().data.schema)


@pytest.fixture(scope="module")
def train_scenes(tiny_synthetic, schema):
    pairs = find_pairs(
        pattern=str(tiny_synthetic / "train" / "*_naip.tif"),
        manifest=None,
        image_suffix="_naip.tif",
        label_suffix="_lc.tif",
    )
    return load_scenes(pairs, bands=4, schema=schema)


def make_dataset(scenes, schema, cache=0, **kwargs):
    reader = SceneReader(scenes, schema.lookup_table(), cache_max_pixels=cache)
    return RandomPatchDataset(
        reader,
        patch_size=kwargs.pop("patch_size", 48),
        length=kwargs.pop("length", 12),
        seed=7,
        **kwargs,
    )


def test_patches_are_reproducible_whatever_the_workers(train_scenes, schema):
    dataset = make_dataset(train_scenes, schema)
    serial = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(make_dataset(train_scenes, schema), batch_size=4, num_workers=2)
    parallel = [pair for images, targets in loader for pair in zip(images, targets, strict=True)]
    for (a_img, a_tgt), (b_img, b_tgt) in zip(serial, parallel, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_tgt, b_tgt)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0], serial[0][0])  # a new epoch draws new patches


def test_cached_and_windowed_reads_agree(train_scenes, schema):
    windowed = make_dataset(train_scenes, schema, cache=0)
    cached = make_dataset(train_scenes, schema, cache=10**9)
    for i in range(4):
        assert torch.equal(windowed[i][0], cached[i][0])
        assert torch.equal(windowed[i][1], cached[i][1])


def test_patch_shapes_and_dtypes(train_scenes, schema):
    image, target = make_dataset(train_scenes, schema)[0]
    assert image.shape == (4, 48, 48) and image.dtype == torch.uint8
    assert target.shape == (48, 48) and target.dtype == torch.uint8
    assert set(target.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}


def test_augmentation_keeps_image_and_labels_aligned(train_scenes, schema):
    """Water is dark in NIR: after any flip/rotation, water pixels must still be the dark ones."""
    dataset = make_dataset(train_scenes, schema, length=40, patch_size=64)
    checked = 0
    for i in range(len(dataset)):
        image, target = dataset[i]
        water = target == 0
        if water.sum() > 50 and (~water).sum() > 50:
            nir = image[3].float()
            assert nir[water].mean() < nir[~water].mean() - 40
            checked += 1
    assert checked > 0


def test_rare_class_rejection_raises_the_rare_share(train_scenes, schema):
    water = schema.class_indices(["water"])[0]

    def water_share(rare):
        dataset = make_dataset(train_scenes, schema, length=60, rare=rare)
        return float(np.mean([(dataset[i][1] == water).float().mean() for i in range(60)]))

    plain = water_share(None)
    boosted = water_share(RareClassSampling((water,), min_fraction=0.05, keep_probability=0.0))
    assert boosted > plain * 1.5


@pytest.mark.parametrize("margin", [0, 8])
def test_grid_covers_every_pixel_exactly_once(train_scenes, schema, margin):
    reader = SceneReader(train_scenes, schema.lookup_table())
    grid = GridPatchDataset(reader, tile=48, margin=margin)
    scene = train_scenes[0]
    coverage = np.zeros((scene.height, scene.width), dtype=int)
    full_target = reader.read_target(0, 0, 0, scene.height, scene.width)
    for item, (index, row, col) in enumerate(grid.windows):
        if index != 0:
            continue
        image, target = grid[item]
        assert image.shape[-1] == 48 + 2 * margin and target.shape == (48, 48)
        valid = target.numpy() != IGNORE_INDEX
        rows, cols = np.nonzero(valid)
        coverage[rows + row, cols + col] += 1
        np.testing.assert_array_equal(target.numpy()[valid], full_target[rows + row, cols + col])
        # the image's centre is the target's window
        centre = image[:, margin : margin + 48, margin : margin + 48].numpy()
        inside = reader.read_image(
            0, row, col, min(48, scene.height - row), min(48, scene.width - col)
        )
        np.testing.assert_array_equal(centre[:, : inside.shape[1], : inside.shape[2]], inside)
    labelled = full_target != IGNORE_INDEX
    assert (coverage[labelled] == 1).all()
