"""Configs compose for every option, and bad values fail before any work with a clear message."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from landcover.config import validate_config
from landcover.errors import ConfigError
from landcover.paths import CONFIG_DIR
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
    assert cfg.optimizer._target_ == "torch.optim.RMSprop" and cfg.optimizer.alpha == 0.95
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.StepLR"
    assert (
        list(cfg.data.normalize.std) == [256.0] * 4 and list(cfg.data.normalize.mean) == [0.0] * 4
    )
    no_data = cfg.data.schema.classes[0]
    assert no_data.name == "no_data" and no_data.ignore  # kept as an output, never a target
    assert list(cfg.data.rare_sampling.classes) == ["water", "barren_impervious"]


def test_the_swapped_split_trains_on_val_and_scores_on_train():
    cfg = validate_config(
        compose_train("experiment=chesapeake_best", "data=chesapeake_sample_swapped")
    )
    assert cfg.data.splits.train.pattern.endswith("/val/*_naip-old.tif")
    assert cfg.data.splits.val.pattern.endswith("/train/*_naip-old.tif")
    assert cfg.model.arch == "seed" and cfg.data.patch_size == 256  # the recipe still applies
    assert str(cfg.init.model).endswith("models/seed-cntk/250epochs.model")


def test_typo_in_key_is_named():
    with pytest.raises(Exception, match="max_epoch"):
        compose_train().trainer.max_epoch = 3  # the composed config is typed: no new keys
    plain = OmegaConf.create(OmegaConf.to_container(compose_train()))  # e.g. from a file
    plain.trainer.max_epoch = 3
    with pytest.raises(ConfigError, match="max_epoch"):
        validate_config(plain)


def test_composition_itself_checks_types_and_keys():
    with pytest.raises(ConfigCompositionException, match="max_epochs"):
        compose_train("trainer.max_epochs=many")
    with pytest.raises(ConfigCompositionException, match="patch_sise"):
        compose_train("data.patch_sise=64")
    with pytest.raises(ConfigCompositionException, match="encoder_depth"):
        compose_train("model.encoder_depth=deep")


def test_bad_choice_is_named():
    with pytest.raises(ConfigError, match="device"):
        validate_config(compose_train("trainer.device=tpu"))
    assert validate_config(compose_train("trainer.device=cuda:1")).trainer.device == "cuda:1"


def test_optimizer_keys_are_its_constructor_arguments():
    cfg = validate_config(compose_train("optimizer=sgd", "optimizer.momentum=0.5"))
    assert cfg.optimizer.momentum == 0.5
    with pytest.raises(ConfigError, match=r"optimizer\.momentm is not an argument of torch"):
        validate_config(compose_train("+optimizer.momentm=0.9"))
    with pytest.raises(ConfigError, match=r"scheduler\.gamma is not an argument"):
        validate_config(compose_train("scheduler=cosine", "+scheduler.gamma=0.5"))
    with pytest.raises(ConfigError, match=r"optimizer\._target_"):
        validate_config(compose_train("optimizer._target_=torch.optim.NoSuchThing"))
    other = validate_config(
        compose_train("optimizer._target_=torch.optim.Adagrad", "~optimizer.eps")
    )
    assert other.optimizer._target_ == "torch.optim.Adagrad"


def schema_defaults() -> dict[str, object]:
    """Every schema field that has a Python default: name -> value."""
    from dataclasses import MISSING, fields, is_dataclass

    import landcover.config as config

    found: dict[str, object] = {}
    for item in vars(config).values():
        if isinstance(item, type) and is_dataclass(item) and item.__module__ == config.__name__:
            for f in fields(item):
                if f.default is not MISSING:
                    found[f.name] = f.default
                elif f.default_factory is not MISSING:
                    found[f.name] = f.default_factory()
    return found


def yaml_leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from yaml_leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for value in node:
            yield from yaml_leaves(value, prefix)
    else:
        yield prefix.rstrip("."), node


def test_no_default_value_is_written_in_yaml_and_in_python():
    """Types in Python, values in YAML: the few Python defaults are for keys no YAML sets."""
    import yaml

    defaults = schema_defaults()
    assert set(defaults) == {"ignore", "pattern", "manifest"}  # a new one: think twice
    clashes = []
    for path in sorted(Path(CONFIG_DIR).rglob("*.yaml")):
        for key, value in yaml_leaves(yaml.safe_load(path.read_text()) or {}):
            name = key.rsplit(".", 1)[-1]
            if name in defaults and value == defaults[name]:
                clashes.append(f"{path.name}: {key}={value!r}")
    assert clashes == []
    # the data files share base.yaml: no data source repeats a value base.yaml already has
    base = dict(yaml_leaves(yaml.safe_load((Path(CONFIG_DIR) / "data" / "base.yaml").read_text())))
    for path in (Path(CONFIG_DIR) / "data").glob("*.yaml"):
        if path.name != "base.yaml":
            own = dict(yaml_leaves(yaml.safe_load(path.read_text())))
            repeated = {k: v for k, v in own.items() if k != "defaults" and base.get(k) == v}
            assert repeated == {}, f"{path.name} repeats base.yaml: {repeated}"


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
