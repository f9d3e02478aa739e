"""The model presets and the one factory: Opacus-compatible presets, any _target_, timm, DP fixes, normalisation."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from aisec_train.backdoor.layers import find_feature_layer
from aisec_train.errors import ConfigError
from aisec_train.models import MODELS, ModelFactory, build_model, check_model_config

SHAPES = [(1, (8, 8), 10), (1, (28, 28), 10), (3, (32, 32), 7), (3, (12, 20), 4)]  # digits, MNIST, CIFAR, non-square


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels, size, classes", SHAPES)
def test_every_preset_is_dp_compatible_and_adapts(name, channels, size, classes):
    model = build_model(name, in_channels=channels, num_classes=classes, image_size=size)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.rand(3, channels, *size)).shape == (3, classes)
    # backdoor analysis finds a feature map on every preset without being told where
    assert find_feature_layer(model, (channels, *size)) == "features_out"


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="choose one of \\['cnn', 'mlp', 'resnet18_gn'\\]"):
        build_model("vgg", in_channels=1, num_classes=10, image_size=8)


def test_timm_models_build_offline_and_batchnorm_is_fixed_for_dp():
    spec = {"_target_": "aisec_train.models.timm_model", "arch": "resnet18"}
    check_model_config(spec)
    factory = ModelFactory(spec, (3, 16, 16), 5, private=True)
    model = factory(seed=0)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    assert ModuleValidator.validate(model, strict=False) == []
    fixes = factory.describe()["dp_fixes"]
    assert {"module": "bn1", "from": "BatchNorm2d", "to": "GroupNorm"} in fixes
    assert find_feature_layer(model, (3, 16, 16)) == "layer4"
    vit = ModelFactory({**spec, "arch": "vit_tiny_patch16_224", "patch_size": 4}, (3, 16, 16), 5)(seed=0)
    assert vit(torch.rand(2, 3, 16, 16)).shape == (2, 5)


def test_timm_refuses_unknown_architectures():
    # model.pretrained=true (timm's published weights, one line without a network): tests/test_finetune.py
    with pytest.raises(ConfigError, match="not a timm model"):
        check_model_config({"_target_": "aisec_train.models.timm_model", "arch": "resnet_999"})


def test_factory_copies_a_model_object_and_refuses_what_opacus_cannot_fix():
    template = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    factory = ModelFactory(None, (3, 2, 2), 3, template=template)
    copy = factory()
    assert copy is not template and torch.equal(copy[1].weight, template[1].weight)
    assert factory.describe()["source"] == "python object"
    lstm = ModelFactory(None, (1, 4, 4), 2, private=True, template=nn.Sequential(nn.Flatten(), nn.LSTM(16, 2)))
    assert lstm.describe()["dp_fixes"] == [{"module": "1", "from": "LSTM", "to": "DPLSTM"}]


def test_resnet18_gn_width_scales_every_stage_and_a_bad_width_is_refused():
    """+model.width=W keeps ResNet-18's layout at W, 2W, 4W, 8W channels (the composition walk runs W=8)."""
    spec = {"_target_": "aisec_train.models.ResNet18GN"}
    full, narrow = (ModelFactory(s, (1, 8, 8), 10)(seed=0) for s in (dict(spec), {**spec, "width": 8}))
    convs = [[m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] for model in (full, narrow)]
    assert convs[0][0] == 64 and convs[1] == [c // 8 for c in convs[0]]
    assert narrow(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ConfigError, match="model.width=0 is not allowed: must be a positive integer"):
        ModelFactory({**spec, "width": 0}, (1, 8, 8), 10)(seed=0)
