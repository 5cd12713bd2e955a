"""Starting from another model: tensors copied by name and shape, output rows re-mapped by
class, fresh where nothing fits, frozen modules held back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from landcover.data.schema import ClassSchema
from landcover.errors import ConfigError
from landcover.models import build_model
from landcover.models.transfer import class_sources, parameter_groups, transfer_weights

SCHEMAS = Path(__file__).resolve().parents[1] / "conf" / "data" / "schema"
TINY = {
    "arch": "unet",
    "encoder_name": "resnet18",
    "encoder_depth": 3,
    "encoder_weights": None,
    "decoder_channels": [32, 16, 8],
}


def schema(name: str) -> ClassSchema:
    return ClassSchema.from_config(yaml.safe_load((SCHEMAS / f"{name}.yaml").read_text()))


def tiny(classes: int, seed: int):
    torch.manual_seed(seed)
    return build_model(TINY, in_channels=4, num_classes=classes, mean=[0.0] * 4, std=[1.0] * 4)


def test_the_tutorial_labels_map_to_the_four_classes_by_label_code():
    chosen = class_sources(schema("tutorial_5label"), schema("chesapeake_4class"), None)
    assert chosen == {
        "water": ["water"],
        "tree_canopy": ["trees"],
        "low_vegetation": ["herbaceous"],
        "barren_impervious": ["barren_impervious"],
    }
    six = class_sources(schema("chesapeake_4class"), schema("chesapeake_6class"), None)
    assert six["road"] == ["barren_impervious"] and six["barren"] == ["barren_impervious"]
    mapped = class_sources(
        schema("tutorial_5label"), schema("chesapeake_4class"), {"water": ["herbaceous"]}
    )
    assert mapped["water"] == ["herbaceous"]
    with pytest.raises(ConfigError, match="init.class_map.water"):
        class_sources(schema("tutorial_5label"), schema("chesapeake_4class"), {"water": ["lava"]})


def test_weights_move_by_name_and_the_head_by_class():
    source_schema, target_schema = schema("tutorial_5label"), schema("chesapeake_4class")
    source, target = tiny(5, seed=1), tiny(4, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = transfer_weights(target, source.state_dict(), source_schema, target_schema)
    after, incoming = target.state_dict(), source.state_dict()
    head = [k for k in after if after[k].shape[:1] == (4,) and incoming[k].shape[:1] == (5,)]
    assert head and sorted(report.remapped) == sorted(head)
    for name in report.loaded:
        assert torch.equal(after[name], incoming[name]), name
    assert "net.encoder.conv1.weight" in report.loaded
    # tutorial rows: 0 no_data, 1 water, 2 trees, 3 herbaceous, 4 barren_impervious
    for name in head:
        for row, source_row in enumerate([1, 2, 3, 4]):
            assert torch.equal(after[name][row], incoming[name][source_row]), (name, row)
    assert not report.fresh and not report.dropped
    assert any(not torch.equal(before[k], after[k]) for k in report.loaded)


def test_a_class_without_a_source_starts_fresh_and_unmatched_tensors_are_reported():
    source_schema = schema("chesapeake_4class")
    target_schema = ClassSchema.from_config(
        {
            "name": "with_snow",
            "classes": [
                {"name": "water", "color": "#0000ff", "codes": [1]},
                {"name": "snow", "color": "#ffffff", "codes": [9]},
            ],
        }
    )
    source, target = tiny(4, seed=1), tiny(2, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = transfer_weights(target, source.state_dict(), source_schema, target_schema)
    assert report.class_sources == {"water": ["water"], "snow": []}
    after = target.state_dict()
    for name, rows in report.remapped.items():
        assert rows == {"water": ["water"]}
        assert torch.equal(after[name][0], source.state_dict()[name][0])
        assert torch.equal(after[name][1], before[name][1])  # snow: its fresh initialisation
    wider = build_model(
        {**TINY, "decoder_channels": [32, 16, 4]},
        in_channels=4,
        num_classes=2,
        mean=[0.0] * 4,
        std=[1.0] * 4,
    )
    partial = transfer_weights(wider, source.state_dict(), source_schema, target_schema)
    assert partial.fresh and "net.encoder.conv1.weight" in partial.loaded
    assert all(name in source.state_dict() for name in partial.dropped)


def test_frozen_modules_are_held_back_or_slowed():
    model = tiny(4, seed=0)
    groups = parameter_groups(model, ["encoder"], 0.0, lr=1e-3)
    assert len(groups) == 1
    frozen = [p for n, p in model.named_parameters() if n.startswith("net.encoder.")]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "encoder" not in n)
    slowed = parameter_groups(tiny(4, seed=0), ["net.encoder.layer1"], 0.1, lr=1e-3)
    assert len(slowed) == 2 and slowed[1]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="init.freeze"):
        parameter_groups(tiny(4, seed=0), ["net.backbone"], 0.0, lr=1e-3)


def test_all_but_head_trains_the_classifier_alone_and_frozen_batchnorm_keeps_its_statistics():
    """What the studio's page uses to fine-tune a studio model: only the last convolution
    learns, and the frozen layers' batch-norm statistics do not drift with the new batches
    (in training mode they did: a frozen encoder still changed what it computes)."""
    from landcover.training.loop import hold_frozen_batchnorm

    model = tiny(4, seed=0)
    groups = parameter_groups(model, ["all_but_head"], 0.0, lr=1e-3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    last_conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in last_conv.parameters()}
    assert trainable and all("segmentation_head" in n for n in trainable)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    model.train()
    hold_frozen_batchnorm(model)
    model(torch.rand(2, 4, 64, 64) * 255)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))
    free = tiny(4, seed=0).train()  # nothing frozen: batch norm learns the batches as before
    free_norms = [m for m in free.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hold_frozen_batchnorm(free)
    free(torch.rand(2, 4, 64, 64) * 255)
    assert not torch.equal(free_norms[0].running_mean, before[0])
