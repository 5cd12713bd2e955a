import pytest
import torch
from torch import nn

from landcover.models import build_model, count_parameters
from landcover.models.seed import SeedNet
from tests.conftest import compose_train


def build(model_name: str, classes: int = 4, *overrides: str):
    cfg = compose_train(f"model={model_name}", *overrides)
    return build_model(
        cfg.model, in_channels=4, num_classes=classes, mean=[0.0] * 4, std=[255.0] * 4
    )


@pytest.mark.parametrize("name", ["unet", "fpn", "deeplabv3plus"])
@pytest.mark.parametrize("size", [(64, 64), (96, 80), (70, 45)])
def test_smp_models_predict_every_pixel_of_any_size(name, size):
    model = build(name).eval()
    with torch.inference_mode():
        logits = model(torch.rand(2, 4, *size) * 255)
    assert logits.shape == (2, 4, *size)
    assert torch.isfinite(logits).all()


def test_encoder_and_decoder_come_from_config():
    small = build("unet", 4, "model.encoder_depth=3", "model.decoder_channels=[32,16,8]")
    assert small.size_divisor == 8
    assert count_parameters(small) < count_parameters(build("unet"))
    resnet34 = build("fpn", 4, "model.encoder_name=resnet34")
    assert count_parameters(resnet34) > count_parameters(build("fpn"))


def test_seed_network_matches_the_published_facts():
    net = SeedNet(4, 5)
    convs = [m for m in net.modules() if type(m) is nn.Conv2d]
    transposed = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert (len(convs), len(transposed), len(norms)) == (25, 3, 17)
    assert all(t.stride == (2, 2) for t in transposed)
    assert count_parameters(net) == 314_373  # the parameters decoded from the CNTK files
    model = build("seed", 5)
    assert model.output_margin == 64
    out = model(torch.rand(2, 4, 256, 256) * 255)
    assert out.shape == (2, 5, 128, 128)
    assert (out >= 0).all()  # the tutorial ends with a ReLU


def test_seed_centres_rgb_per_patch_but_not_nir():
    net = SeedNet(4, 5).eval()
    x = torch.rand(1, 4, 64, 64)
    shifted = x.clone()
    shifted[:, :3] += 0.2
    with torch.inference_mode():
        assert torch.allclose(net(x), net(shifted), atol=1e-5)
        nir_shifted = x.clone()
        nir_shifted[:, 3] += 0.2
        assert not torch.allclose(net(x), net(nir_shifted), atol=1e-5)


def test_normalisation_lives_in_the_model():
    model = build("unet")
    raw = torch.full((1, 4, 8, 8), 255.0)
    assert torch.allclose(model.normalize(raw), torch.ones_like(raw))
    assert "mean" in model.state_dict() and "std" in model.state_dict()
