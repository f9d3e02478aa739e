"""The model registry: every model is Opacus-compatible and adapts to the dataset's shape and classes."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from aisec_train.models import MODELS, build_model, feature_layer

SHAPES = [(1, 8, 10), (1, 28, 10), (3, 32, 7)]  # (channels, image size, classes): digits, MNIST, CIFAR-like


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels, size, classes", SHAPES)
def test_every_model_is_dp_compatible_and_adapts(name, channels, size, classes):
    model = build_model(name, in_channels=channels, num_classes=classes, image_size=size)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.rand(3, channels, size, size)
    assert model(x).shape == (3, classes)
    features = []
    handle = feature_layer(model).register_forward_hook(lambda _m, _i, out: features.append(out))
    model(x)
    handle.remove()
    assert features[0].dim() == 4 and features[0].shape[0] == 3  # an (N, C, H, W) map for backdoor analysis


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="choose one of \\['cnn', 'mlp', 'resnet18_gn'\\]"):
        build_model("vgg", in_channels=1, num_classes=10, image_size=8)
