"""``model=timm model.arch=NAME``: the timm model zoo (optional extra ``aisec-train[timm]``), built offline.

``model.pretrained=true`` loads timm's published weights when the network allows (one line when it does not);
``model.checkpoint_path=FILE`` loads a local file through the factory (models/finetune.py), head resized.
Vision transformers get the dataset's image size; BatchNorm models are made DP-trainable by the factory
(Opacus' ``ModuleValidator.fix``) when ``privacy=dpsgd``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from aisec_train.errors import ConfigError


def _timm():
    try:
        import timm
    except ImportError as err:
        raise ConfigError("model=timm is not allowed: timm is not installed; pip install 'aisec-train[timm]'") from err
    return timm


def check_arch(arch: str) -> None:
    if not _timm().is_model(arch):
        raise ConfigError(f"model.arch={arch!r} is not allowed: not a timm model (see timm.list_models())")


def timm_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 224,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(arch, num_classes=..., in_chans=...)``; transformers also get ``img_size``."""
    kwargs.pop("input_shape", None)  # the factory offers it to every **kwargs target; timm sizes by img_size
    timm = _timm()
    check_arch(arch)
    common = dict(num_classes=num_classes, in_chans=in_channels, pretrained=pretrained, **kwargs)
    try:
        try:
            return timm.create_model(arch, img_size=image_size, **common)
        except TypeError:  # convolutional families take no img_size: they adapt through global pooling
            return timm.create_model(arch, **common)
    except (OSError, RuntimeError) as err:  # no network, no such weights: one line, not a page of retries
        if not pretrained:
            raise
        reason = " ".join(str(err).split())[:160]
        raise ConfigError(
            f"model.pretrained=True is not allowed here: timm could not fetch {arch!r} weights ({reason}); "
            "give a local file with model.checkpoint_path=FILE"
        ) from None
