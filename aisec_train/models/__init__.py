"""Models: built-in presets, the timm zoo, input normalisation and the one model factory."""

from aisec_train.models.factory import ModelFactory, check_model_config
from aisec_train.models.normalize import InputNormalization
from aisec_train.models.presets import MLP, MODELS, ResNet18GN, SmallCNN, build_model, register_model
from aisec_train.models.zoo import timm_model

__all__ = [
    "MLP",
    "MODELS",
    "InputNormalization",
    "ModelFactory",
    "ResNet18GN",
    "SmallCNN",
    "build_model",
    "check_model_config",
    "register_model",
    "timm_model",
]
