"""``model=hf model.path=DIR``: a Hugging Face sequence classifier and its tokenizer, from the same local folder.

``AutoModelForSequenceClassification`` and ``AutoTokenizer`` load from ``path`` with ``trust_remote_code`` off
unless ``model.trust_remote_code=true`` says otherwise (a model folder's own Python is code you run). A head
for another class count is re-initialised (``ignore_mismatched_sizes``) and reported by the factory like any
resized head. The wrapper takes the ``(N, max_length)`` token ids the text dataset yields and returns logits, so
the training loop, Opacus and the fine-tuning keys (``trainable``, ``lora``) treat it like any other network.

    >>> model = hf_model("tiny-bert/", num_classes=2)
    >>> model(torch.tensor([[101, 7, 8, 102, 0, 0]])).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import torch
from torch import nn

from aisec_train.errors import ConfigError


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(
            "model=hf is not allowed: transformers is not installed; pip install 'aisec-train[finetune]'"
        ) from err
    return transformers


class HFClassifier(nn.Module):
    """Token ids in, logits out; padding (``pad_token_id``) is masked out of attention."""

    def __init__(self, model: nn.Module, pad_token_id: int):
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id
        takes = inspect.signature(model.forward).parameters
        self._positions, self._token_types = "position_ids" in takes, "token_type_ids" in takes

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.long()
        n, length = input_ids.shape
        extra = {}
        # Given per record (not the model's shared (1, L) buffers): an embedding lookup whose batch dimension is 1
        # would give per-sample gradient hooks one "sample" for the whole batch (Opacus needs batch-first inputs).
        if self._positions:
            extra["position_ids"] = torch.arange(length, device=input_ids.device).repeat(n, 1)
        if self._token_types:
            extra["token_type_ids"] = torch.zeros_like(input_ids)
        mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask, **extra).logits

    def get_classifier(self) -> nn.Module:
        """The classification head (the factory's ``trainable=head`` and its head re-initialisation read it)."""
        for name in ("classifier", "score", "classification_head"):
            head = getattr(self.model, name, None)
            if isinstance(head, nn.Module):
                if isinstance(head, nn.Linear):
                    return head
                linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
                if linears:
                    return linears[-1]
        raise ConfigError(f"model=hf: {type(self.model).__name__} has no classifier head this wrapper knows")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    try:
        return _transformers().AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path={path!r} holds no tokenizer: {' '.join(str(err).split())[:200]}") from None


def hf_model(path: str, num_classes: int, trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """The classifier saved at ``path`` (``save_pretrained``), with a ``num_classes`` head."""
    for key in ("in_channels", "image_size", "input_shape"):
        kwargs.pop(key, None)  # image shapes the factory offers every **kwargs target
    transformers = _transformers()
    tokenizer = load_tokenizer(path, trust_remote_code)
    quiet = transformers.utils.logging  # the factory builds a model several times a run: one load report, ours
    verbosity, bar = quiet.get_verbosity(), quiet.is_progress_bar_enabled()
    quiet.set_verbosity_error()  # re-initialised layers are listed in report.json's model.reinitialized_layers
    quiet.disable_progress_bar()
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_classes, ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code,
            output_loading_info=True, **kwargs,
        )  # fmt: skip
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path={path!r} cannot be loaded: {' '.join(str(err).split())[:200]}") from None
    except pickle.UnpicklingError:  # a pytorch_model.bin holding Python objects: never unpickled (weights_only)
        raise ConfigError(
            f"model.path={path!r} cannot be loaded: its weights file holds Python objects besides tensors, which "
            "torch.load(weights_only=True) refuses to run; save the model with save_pretrained (safetensors)"
        ) from None
    finally:
        quiet.set_verbosity(verbosity)
        if bar:
            quiet.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"model.path={path!r}: the tokenizer has no padding token; set pad_token and save it again")
    model.config.pad_token_id = tokenizer.pad_token_id
    wrapped = HFClassifier(model, int(tokenizer.pad_token_id))
    fresh = [
        k if isinstance(k, str) else k[0] for k in [*info.get("missing_keys", []), *info.get("mismatched_keys", [])]
    ]
    wrapped.reinitialized_layers = sorted({"model." + k.rsplit(".", 1)[0] for k in fresh})  # read by the factory
    return wrapped
