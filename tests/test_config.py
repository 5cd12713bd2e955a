"""Configs compose for every option, and bad values fail before any work with a clear message."""

import pytest
from omegaconf import OmegaConf

from landcover.config import validate_config
from landcover.errors import ConfigError
from tests.conftest import compose_train


@pytest.mark.parametrize("data", ["synthetic", "chesapeake_sample", "geotiff", "chesapeake_cvpr"])
@pytest.mark.parametrize("model", ["unet", "fpn", "deeplabv3plus", "seed", "pixel_gbm"])
def test_every_data_and_model_option_composes(data, model):
    overrides = [f"data={data}", f"model={model}"]
    if data in ("geotiff", "chesapeake_cvpr"):
        overrides.append("data.root=/some/where")
    cfg = validate_config(compose_train(*overrides))
    assert cfg.model.arch == model
    assert cfg.data.name == data
    assert cfg.data.splits.train.pattern.startswith("/some/where") or data in (
        "synthetic",
        "chesapeake_sample",
    )


def test_presets_compose():
    for overrides in (
        ["experiment=demo"],
        ["trainer=gpu"],
        ["optimizer=rmsprop", "scheduler=step"],
        ["data/schema=tutorial_5label"],
        ["data/schema=chesapeake_6class"],
    ):
        validate_config(compose_train(*overrides))


def test_seed_tutorial_is_the_tutorial_recipe():
    cfg = validate_config(compose_train("experiment=seed_tutorial"))
    assert cfg.model.arch == "seed" and cfg.data.name == "chesapeake_sample"
    assert (cfg.data.patch_size, cfg.data.batch_size) == (256, 10)
    assert cfg.optimizer.name == "rmsprop" and cfg.scheduler.name == "step"
    assert (
        list(cfg.data.normalize.std) == [256.0] * 4 and list(cfg.data.normalize.mean) == [0.0] * 4
    )
    no_data = cfg.data.schema.classes[0]
    assert no_data.name == "no_data" and no_data.ignore  # kept as an output, never a target
    assert list(cfg.data.rare_sampling.classes) == ["water", "barren_impervious"]


def test_typo_in_key_is_named():
    cfg = compose_train()
    OmegaConf.set_struct(cfg, False)
    cfg.trainer.max_epoch = 3  # a typo that slipped into a YAML file
    with pytest.raises(ConfigError, match="max_epoch"):
        validate_config(cfg)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="max_epochs"):
        validate_config(compose_train("trainer.max_epochs=many"))


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match="device"):
        validate_config(compose_train("trainer.device=tpu"))
    with pytest.raises(ConfigError, match="optimizer.name|name"):
        validate_config(compose_train("optimizer.name=adagrad"))


def test_out_of_range_values():
    with pytest.raises(ConfigError, match="optimizer.lr=-0.1 must be positive"):
        validate_config(compose_train("optimizer.lr=-0.1"))
    with pytest.raises(ConfigError, match="data.normalize.std has 3 entries"):
        validate_config(compose_train("data.normalize.std=[1,1,1]"))


def test_wrong_key_for_the_architecture():
    with pytest.raises(ConfigError, match="decoder_pyramid_channels"):
        validate_config(compose_train("model=unet", "+model.decoder_pyramid_channels=64"))


def test_missing_required_root():
    with pytest.raises(ConfigError, match="root"):
        validate_config(compose_train("data=geotiff"))
