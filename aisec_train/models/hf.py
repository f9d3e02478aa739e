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

import hashlib
import inspect
import pickle
from typing import Any

import torch
from torch import nn

from aisec_train.errors import ConfigError
from aisec_train.hashing import tensor_bytes


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
        # RoBERTa's family numbers positions per record from padding_idx + 1 (its own (N, L) ids): 0, 1, 2, ...
        # there shifted every position and fine-tuned another function than the checkpoint's. GPT-2 takes
        # token_type_ids but looks them up in its word embedding: zeros added token 0's embedding everywhere.
        embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
        own = hasattr(embeddings, "create_position_ids_from_input_ids")
        self._positions = "position_ids" in takes and not own
        self._token_types = "token_type_ids" in takes and hasattr(embeddings, "token_type_embeddings")
        # A longer dataset.max_length used to fail the factory's check with "index out of range in self".
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and own:
            limit -= int(getattr(embeddings, "padding_idx", 0) or 0) + 1  # positions start after padding_idx
        self.max_length = limit if isinstance(limit, int) else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.long()
        n, length = input_ids.shape
        if self.max_length is not None and length > self.max_length:
            raise ValueError(
                f"dataset.max_length={length} is not allowed with this model: at most {self.max_length} tokens "
                "(its position embeddings)"
            )
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
        """The classification head (the factory's ``trainable=head`` and its head re-initialisation read it): the
        whole module, so a two-layer head (RoBERTa's ``dense`` + ``out_proj``, which a base checkpoint lacks) trains
        as a whole; its last Linear alone left ``dense`` frozen at its random initialisation."""
        for name in ("classifier", "score", "classification_head"):
            head = getattr(self.model, name, None)
            if isinstance(head, nn.Module) and any(isinstance(m, nn.Linear) for m in head.modules()):
                return head
        raise ConfigError(f"model=hf: {type(self.model).__name__} has no classifier head this wrapper knows")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    try:
        return _transformers().AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path={path!r} holds no tokenizer: {' '.join(str(err).split())[:200]}") from None


def check_loaded(path: str, model: nn.Module, info: dict[str, Any]) -> None:
    """Refuse a weights file that does not fit the pretrained body or holds NaN / inf, before any work.

    ``ignore_mismatched_sizes`` (needed for a head of another class count) also lets transformers re-initialise any
    body tensor of another shape, and a body tensor missing from the file is initialised at random: a damaged or
    substituted file trained from noise, exit 0. Only the task head (outside ``base_model_prefix``: ``classifier``,
    ``pre_classifier``, ``score``) may start fresh, as a resized head does for ``model.checkpoint_path``. NaN or inf
    weights used to start training and stop at the first step's loss, after the ledger was opened."""
    prefix = getattr(model, "base_model_prefix", "")
    for entry in info.get("mismatched_keys", []):
        key, in_file, in_model = entry if not isinstance(entry, str) else (entry, "?", "?")
        if prefix and key.startswith(prefix + "."):
            raise ConfigError(
                f"model.path={path!r} does not fit this model: {key} is {tuple(in_file)} in the file, "
                f"{tuple(in_model)} in the model; only the classifier head may differ"
            )
    for key in info.get("missing_keys", []):
        if prefix and key.startswith(prefix + "."):
            raise ConfigError(
                f"model.path={path!r} does not fit this model: {key} is missing from the file (is it the same "
                "architecture?); only the classifier head may be missing"
            )
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(
                f"model.path={path!r} is not allowed: {key} holds NaN or inf; every weight must be finite"
            )


def hf_model(path: str, num_classes: int, trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """The classifier saved at ``path`` (``save_pretrained``), with a ``num_classes`` head."""
    for key in ("in_channels", "image_size", "input_shape"):
        kwargs.pop(key, None)  # image shapes the factory offers every **kwargs target
    if kwargs.pop("pretrained", False):  # offered to any **kwargs target; transformers answered with a TypeError
        raise ConfigError("model.pretrained=True is not allowed with model=hf: the weights are model.path's folder")
    if not isinstance(trust_remote_code, bool):  # transformers tests truthiness: the string 'false' ran the code
        raise ConfigError(
            f"model.trust_remote_code={trust_remote_code!r} is not allowed: true or false (a YAML boolean, not a "
            "string); true runs the folder's own Python"
        )
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
    check_loaded(path, model, info)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"model.path={path!r}: the tokenizer has no padding token; set pad_token and save it again")
    model.config.pad_token_id = tokenizer.pad_token_id
    wrapped = HFClassifier(model, int(tokenizer.pad_token_id))
    fresh = [
        k if isinstance(k, str) else k[0] for k in [*info.get("missing_keys", []), *info.get("mismatched_keys", [])]
    ]
    wrapped.reinitialized_layers = sorted({"model." + k.rsplit(".", 1)[0] for k in fresh})  # read by the factory
    wrapped.loaded_sha256 = loaded_digest(model, set(fresh))  # read by the factory
    return wrapped


def loaded_digest(model: nn.Module, fresh: set[str]) -> str:
    """SHA-256 of the tensors transformers loaded from the folder (names, dtypes, shapes, bytes; the re-initialised
    head left out): taken from what was parsed, not from the folder's files afterwards. The factory builds the model
    several times a run and transformers re-reads the folder each time; equal digests mean every build (training,
    audit references, clients) started from the same weights, and the report names them."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if name in fresh:
            continue
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(tensor_bytes(value))
    return digest.hexdigest()
