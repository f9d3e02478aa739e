"""The one model factory: the model is described once, and every stage that needs a fresh copy asks it.

Training, the membership audit's reference models, the extraction surrogate, data-parallel ranks, federated
clients and the one-run privacy audit's canary model all call the :class:`ModelFactory` handed down the pipeline;
nothing else constructs a model. It is built from the ``model`` config (a Hydra ``_target_``) or from a model
object given to the Python API, fills in the arguments the data decides (``in_channels``, ``num_classes``,
``image_size``, ``input_shape``) when the constructor takes them, makes the model trainable by Opacus under DP
(``ModuleValidator.fix``: BatchNorm -> GroupNorm, ...), and puts input normalisation in front.

>>> factory = ModelFactory({"_target_": "aisec_train.models.SmallCNN"}, input_shape=(1, 8, 8), num_classes=10)
>>> model = factory(seed=0)                     # a fresh, seeded copy; factory.describe() for the report
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aisec_train.components import accepted, build, check_target
from aisec_train.errors import ConfigError
from aisec_train.models import finetune
from aisec_train.models.normalize import InputNormalization, inner

SHAPE_ARGS = ("in_channels", "num_classes", "image_size", "input_shape")


def check_model_config(node: Any) -> None:
    """Refuse an unimportable model target or arguments its constructor does not take, before any work."""
    node, tune = finetune.split(node)
    target = check_target(node, "model", supplied=SHAPE_ARGS)
    _check_pretrained(target, node, tune)
    if getattr(target, "__name__", "") == "timm_model":
        from aisec_train.models.zoo import check_arch

        check_arch(str(node.get("arch")))


@dataclass
class ModelFactory:
    spec: dict[str, Any] | None  # the model config; None when the model comes as an object (``template``)
    input_shape: tuple[int, int, int]
    num_classes: int
    private: bool = False  # make BatchNorm and friends trainable by Opacus (ModuleValidator.fix)
    normalize: tuple[list[float], list[float]] | None = None
    template: nn.Module | None = None  # the Python API's model object, copied as is for every fresh model
    device: str = "cpu"  # where LoRA adapters are created (before peft wraps the model: opacus#820)
    # The config's fine-tuning keys (model.trainable, model.lora.*, model.checkpoint_path, model.batchnorm) when the
    # model comes as an object: they apply to it as to a config-built model, never silently ignored.
    template_tuning: dict[str, Any] | None = None
    # (state dict, SHA-256 of the bytes it was parsed from, how they were verified): read once per factory, so every
    # model of a run (training, audit references, clients) starts from the same bytes and the report names them
    _weights: tuple[dict[str, Any], str, str] | None = field(default=None, init=False, repr=False, compare=False)
    _loaded: str | None = field(default=None, init=False, repr=False, compare=False)  # model=hf: the first build's
    _tuned: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, seed: int | None = None) -> nn.Module:
        """A fresh model; ``seed`` fixes the initial weights of a config-built model."""
        if seed is not None:
            torch.manual_seed(seed)
        if self.template is not None:
            model = copy.deepcopy(self.template)
        else:
            model = self._build()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model._target_={self.target!r} built a {type(model).__name__}, not a torch nn.Module")
        if self.template is not None and _tunes(self.template_tuning):
            model = self._fine_tune(model, self.template_tuning)
        elif self.template is not None:
            model = fix_for_dp(model, self.target) if self.private else model
            self._tuned = {"trainable": "as given", **finetune.parameter_counts(model)}
        else:
            model = self._fine_tune(model, self.spec)
        if self.normalize is not None:
            model = InputNormalization(model, *self.normalize)
        return model

    def _build(self) -> nn.Module:
        node, tune = finetune.split(self.spec)
        target = check_target(node, "model", supplied=SHAPE_ARGS)
        _check_pretrained(target, node, tune)
        if tune.pretrained:
            node["pretrained"] = True  # timm downloads (or fails in one line) and re-initialises a resized head
        return build(node, "model", **self._shape_args(target))

    def _fine_tune(self, model: nn.Module, node: dict[str, Any] | None) -> nn.Module:
        """Pretrained weights in, BatchNorm made DP-safe, everything but ``model.trainable`` frozen, LoRA added."""
        _, tune = finetune.split(node)
        head = finetune.head_name(model)
        reinit: list[str] = []
        if tune.checkpoint_path is not None:
            if self._weights is None:
                state, digest = finetune.read_weights(tune.checkpoint_path, tune.checkpoint_sha256)
                self._weights = (state, digest, finetune.provenance(tune.checkpoint_path, tune.checkpoint_sha256))
            reinit = finetune.load_weights(model, self._weights[0], tune.checkpoint_path)
        elif getattr(model, "reinitialized_layers", None) is not None:  # model=hf: transformers says which
            reinit = list(model.reinitialized_layers)
            self._same_weights(getattr(model, "loaded_sha256", None), node)
        elif tune.pretrained and head is not None:
            published = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
            reinit = [head] if published is not None and published != self.num_classes else []
        mode = tune.batchnorm
        if mode == "auto":
            mode = "freeze" if tune.loads_weights else "groupnorm" if self.private else "keep"
        if not finetune.has_batchnorm(model):
            mode = "none"
        frozen = finetune.freeze_batchnorm(model) if mode == "freeze" else []
        if self.private or mode == "groupnorm":
            model = fix_for_dp(model, self.target)
        finetune.select_trainable(model, tune.trainable, head, reinit)
        if tune.trainable == "lora":
            model = finetune.add_lora(model, tune, head, self.device, reinit)
            if self.private:  # adapters Opacus cannot clip per sample are refused before any step
                finetune.check_private_adapters(model)
        batchnorm = {
            "freeze": f"frozen in eval mode ({len(frozen)} layers: running statistics as constants, affine fixed)",
            "groupnorm": "converted to GroupNorm (Opacus ModuleValidator.fix; fresh affine parameters)",
            "keep": "kept as BatchNorm (not private: batch statistics are used in training)",
            "none": "none in the model",
        }[mode]
        self._tuned = {
            "checkpoint_path": tune.checkpoint_path,
            "checkpoint_sha256": self._weights[1] if tune.checkpoint_path and self._weights else None,
            "checkpoint_verified": self._weights[2] if tune.checkpoint_path and self._weights else None,
            "pretrained": tune.pretrained,
            "reinitialized_layers": reinit,
            "head": head,
            "trainable": tune.trainable,
            "batchnorm": batchnorm,
            "lora": tune.lora_config() if tune.trainable == "lora" else None,
            **finetune.parameter_counts(model),
        }
        if self._loaded is not None:
            self._tuned["weights_sha256"] = self._loaded
        return model

    def _same_weights(self, digest: str | None, node: dict[str, Any] | None) -> None:
        """Refuse a model=hf build whose loaded weights differ from the run's first build: transformers re-reads
        model.path at every build, and a folder changed mid-run would train, audit and report a mix."""
        if digest is None:
            return
        if self._loaded is None:
            self._loaded = digest
        elif digest != self._loaded:
            path = (node or {}).get("path")
            raise ConfigError(
                f"model.path={path!r} changed during the run: its weights now load as {digest[:16]}..., the run "
                f"started from {self._loaded[:16]}...; refusing to train or report a mix of two models"
            )

    def checkpoint_digest(self) -> str | None:
        """The SHA-256 of the checkpoint bytes this factory's models start from (None without model.checkpoint_path):
        a pin for copies of the run that read the file again (federated SuperNodes)."""
        tuning = self.template_tuning if self.template is not None else self.spec
        if finetune.split(tuning)[1].checkpoint_path is None:
            return None
        if self._weights is None:
            self(seed=0)  # reads it (once) and loads it, as every build does
        return self._weights[1] if self._weights else None

    @property
    def target(self) -> str:
        if self.template is not None:
            return f"{type(self.template).__module__}.{type(self.template).__qualname__}"
        return str((self.spec or {}).get("_target_"))

    def _shape_args(self, target: Any) -> dict[str, Any]:
        if len(self.input_shape) != 3:  # token ids (dataset=text): only the class count is the data's to decide
            return {"num_classes": self.num_classes} if "num_classes" in accepted(target, SHAPE_ARGS) else {}
        c, h, w = self.input_shape
        values = {"in_channels": c, "num_classes": self.num_classes, "image_size": h if h == w else (h, w),
                  "input_shape": (c, h, w)}  # fmt: skip
        given = set(finetune.split(self.spec)[0])
        return {k: v for k, v in values.items() if k in accepted(target, SHAPE_ARGS) and k not in given}

    def check(self, model: nn.Module | None = None) -> None:
        """A forward pass on two blank images must give (2, num_classes) logits; else refuse before training."""
        model = model if model is not None else self(seed=0)
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, *self.input_shape, device=device))
        except Exception as err:  # noqa: BLE001 - the user's forward failed on the data's shape: one line
            what = "token ids" if len(self.input_shape) == 1 else "images"
            raise ConfigError(  # from None: the line holds the error's text; chained, the CLI printed it twice
                f"model._target_={self.target!r} cannot take {what} of shape {self.input_shape}: "
                f"{' '.join(str(err).split())[:200]}"
            ) from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, self.num_classes):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"model._target_={self.target!r} returns {shape} for 2 images; expected (2, {self.num_classes}) "
                "logits (does it take num_classes?)"
            )

    def describe(self) -> dict[str, Any]:
        """What the report says about the model: target, arguments, DP fixes, normalisation, size."""
        raw = copy.deepcopy(self.template) if self.template is not None else None
        if raw is None:
            raw = self._build()
        built = inner(self(seed=0))  # sets self._tuned: what was loaded, frozen and re-initialised
        converted = str(self._tuned.get("batchnorm", "")).startswith(("frozen", "converted"))
        replaced = _replacements(raw, built) if self.private or converted else []
        args = {k: v for k, v in finetune.split(self.spec)[0].items() if not k.startswith("_")}
        return {
            **self._tuned,
            "target": self.target,
            "arguments": args,
            "source": "python object" if self.template is not None else "config",
            "parameters": sum(p.numel() for p in raw.parameters()),
            "dp_fixes": replaced,
            "input_normalization": None
            if self.normalize is None
            else {"mean": self.normalize[0], "std": self.normalize[1]},
        }


def _check_pretrained(target: Any, node: dict[str, Any], tune: finetune.FineTune) -> None:
    if tune.pretrained and "pretrained" not in accepted(target, ("pretrained",)):
        raise ConfigError(
            f"model.pretrained=True is not allowed with model._target_={node.get('_target_')!r}: only model=timm "
            "loads published weights; give a local file with model.checkpoint_path=FILE"
        )
    if tune.pretrained and tune.checkpoint_path:
        raise ConfigError("model.pretrained=True is not allowed with model.checkpoint_path: give one source of weights")


def fix_for_dp(model: nn.Module, target: str) -> nn.Module:
    """``model`` made trainable by Opacus (BatchNorm -> GroupNorm, ..., activations out of place), or a
    ConfigError naming ``target`` when Opacus still refuses it."""
    from opacus.validators import ModuleValidator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about every replaced module; the report lists them
        fixed = ModuleValidator.fix(model)
        errors = ModuleValidator.validate(fixed, strict=False)
    for module in fixed.modules():
        # In-place activations overwrite the tensors per-sample gradient hooks read (Opacus' hooks mode refuses
        # them); out of place they compute the same function.
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    if errors:
        raise ConfigError(
            f"model._target_={target!r} cannot be trained with privacy=dpsgd: Opacus reports "
            f"{' '.join(str(errors[0]).split())[:200]}"
        )
    # Opacus validates and replaces BatchNorm by exact type, so a subclass (timm's BatchNormAct2d in EfficientNet,
    # MobileNetV3, RegNet) passed both: with its parameters frozen it trained in batch-statistics mode (one record's
    # output depends on the others', outside the clip) and released running statistics of the private data.
    left = next(((n, m) for n, m in fixed.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if left is not None:
        raise ConfigError(
            f"model._target_={target!r} cannot be trained with privacy=dpsgd: {left[0]!r} is a "
            f"{type(left[1]).__name__}, a BatchNorm Opacus does not replace (batch statistics mix records); "
            "allowed: model.batchnorm=freeze (running statistics as constants), or GroupNorm in the model"
        )
    return fixed


def _replacements(before: nn.Module, after: nn.Module) -> list[dict[str, str]]:
    def kind(m: nn.Module) -> str:
        return type(m).__name__ + ("(inplace)" if getattr(m, "inplace", False) is True else "")

    old = {name: kind(m) for name, m in before.named_modules()}
    return [
        {"module": name or "<root>", "from": old[name], "to": kind(m)}
        for name, m in after.named_modules()
        if name in old and old[name] != kind(m)
    ]


def _tunes(node: dict[str, Any] | None) -> bool:
    """Whether the fine-tuning keys ask for anything beyond training a given model object as it is."""
    _, tune = finetune.split(node)
    if tune.pretrained:
        raise ConfigError(
            "model.pretrained=true is not allowed with a model object: load its weights before passing it, "
            "or give model.checkpoint_path"
        )
    return tune.trainable != "all" or tune.checkpoint_path is not None or tune.batchnorm != "auto"
