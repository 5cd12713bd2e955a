"""Losses from config: weighted terms from smp, class weights by name or from the labels."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from landcover.config import validate_config
from landcover.data.schema import IGNORE_INDEX, ClassSchema
from landcover.errors import ConfigError
from landcover.training.optim import WeightedLoss, auto_class_weights, build_loss
from tests.conftest import compose_train


def schema(cfg) -> ClassSchema:
    return ClassSchema.from_config(OmegaConf.to_container(cfg.data.schema))


def batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16)
    target = torch.randint(0, 4, (2, 16, 16))
    target[0, :4] = IGNORE_INDEX
    return logits, target


@pytest.mark.parametrize(
    "terms",
    [
        (),
        ("loss.cross_entropy=0", "loss.dice=1.0"),
        ("loss.cross_entropy=0", "loss.focal=1.0"),
        ("loss.cross_entropy=0", "loss.lovasz=1.0"),
        ("loss.dice=0.5",),
        ("loss.cross_entropy=0", "loss.focal=2.0", "loss.lovasz=1.0"),
    ],
)
def test_every_loss_config_composes_and_gives_a_finite_loss(terms):
    cfg = validate_config(compose_train(*terms))
    loss = build_loss(cfg.loss, schema(cfg))
    logits, target = batch()
    value = loss(logits.requires_grad_(), target)
    assert torch.isfinite(value) and value.ndim == 0
    value.backward()  # differentiable end to end


def test_a_weighted_sum_is_the_sum_of_its_weighted_terms():
    cfg = validate_config(compose_train("loss.dice=0.5"))
    combined = build_loss(cfg.loss, schema(cfg))
    assert isinstance(combined, WeightedLoss)
    logits, target = batch()
    parts = {name: loss(logits, target) for name, loss in combined.terms.items()}
    expected = parts["cross_entropy"] + 0.5 * parts["dice"]
    assert combined(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # ignored pixels do not count: changing their logits changes nothing
    changed = logits.clone()
    changed[0, :, :4] = 100.0
    assert combined(changed, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_auto_class_weights_are_median_frequency_balanced_and_clipped():
    weights = auto_class_weights([600, 300, 99, 1], clip=10.0)
    assert weights[0] < weights[1] < weights[2] < weights[3] == pytest.approx(10.0)  # clipped
    assert weights[0] == pytest.approx(weights[1] / 2)  # inverse to frequency
    assert auto_class_weights([0, 50, 50], clip=10.0)[0] == 1.0  # absent class: neutral
    assert auto_class_weights([1, 3, 9], clip=100.0) == pytest.approx([3.0, 1.0, 1 / 3])


def test_class_weights_auto_reads_the_train_label_counts():
    cfg = validate_config(compose_train("loss.class_weights=auto"))
    loss = build_loss(cfg.loss, schema(cfg), class_pixels=[600, 300, 99, 1])
    assert loss.weight.tolist() == pytest.approx(auto_class_weights([600, 300, 99, 1], 10.0))
    with pytest.raises(ConfigError, match="class counts"):
        build_loss(cfg.loss, schema(cfg), class_pixels=None)


def test_bad_loss_configs_are_one_line_errors():
    with pytest.raises(ConfigError, match="every weight"):
        cfg = validate_config(compose_train("loss.cross_entropy=0"))
        build_loss(cfg.loss, schema(cfg))
    with pytest.raises(ConfigError, match="loss.dice=-1.0"):
        cfg = validate_config(compose_train("loss.dice=-1"))
        build_loss(cfg.loss, schema(cfg))
    with pytest.raises(ConfigError, match="unknown classes"):
        cfg = validate_config(compose_train("loss.class_weights={lava: 2.0}"))
        build_loss(cfg.loss, schema(cfg))
    with pytest.raises(ConfigError, match="auto_weight_clip"):
        validate_config(compose_train("loss.auto_weight_clip=0.5"))
