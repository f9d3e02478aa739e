"""Fine-tuning a pretrained network: which weights it starts from, which it trains, how its BatchNorm behaves.

The model config's fine-tuning keys (every ``configs/model/*.yaml`` carries them, so no ``+`` is needed) are read
here and never reach the network's constructor:

- ``checkpoint_path``: a state dict, a timm / torchvision checkpoint (possibly under ``state_dict`` / ``model``)
  or an aisec-train ``model.pt`` (its keyed tag verified when it has one); always ``torch.load(weights_only=True)``.
- ``checkpoint_sha256``: the file's SHA-256, pinned (a file that differs is refused). A file with neither a keyed
  tag nor a pin is loaded unverified, and the report's ``model.checkpoint_verified`` says so: deleting an
  aisec-train model.pt's tag makes it such a file, so pin what you fine-tune from.
  A head whose class count differs is left at its fresh initialisation and listed as re-initialised.
- ``trainable``: ``all``, ``head``, ``lora`` (adapters plus the head; both with the re-initialised layers) or a
  regular expression over parameter names (which must match every re-initialised layer); everything else gets
  ``requires_grad=False``, so Opacus clips and noises only what trains.
- ``batchnorm``: ``freeze`` (running statistics used as constants, affine fixed: no statistic across records),
  ``groupnorm`` (Opacus' replacement) or ``auto`` (freeze when weights were loaded, else groupnorm under DP).
- ``lora``: ``r``, ``alpha``, ``dropout``, ``target_modules`` (null: every Linear and Conv2d but the head).

>>> spec = FineTune.parse({"checkpoint_path": "in1k.pth", "trainable": "head"})
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from aisec_train.errors import ConfigError

KEYS = ("checkpoint_path", "checkpoint_sha256", "pretrained", "trainable", "batchnorm", "lora")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
BATCHNORM = ("auto", "freeze", "groupnorm")
WRAPPER_KEYS = ("state_dict", "model", "model_state", "state", "module")  # where trainers nest the weights


@dataclass(frozen=True)
class FineTune:
    checkpoint_path: str | None = None
    pretrained: bool = False
    trainable: str = "all"
    batchnorm: str = "auto"
    lora: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str | None = None

    @classmethod
    def parse(cls, node: dict[str, Any] | None) -> FineTune:
        """The fine-tuning keys of a model config, checked (one line naming the bad value) before any work."""
        node = dict(node or {})
        path = node.get("checkpoint_path") or None
        if path is not None and not Path(str(path)).is_file():
            raise ConfigError(f"model.checkpoint_path={path!r} is not allowed: no such file")
        trainable = str(node.get("trainable") or "all")
        if trainable not in ("all", "head", "lora"):
            try:
                re.compile(trainable)
            except re.error as err:
                raise ConfigError(
                    f"model.trainable={trainable!r} is not allowed: all, head, lora or a regular expression over "
                    f"parameter names ({err})"
                ) from None
        batchnorm = str(node.get("batchnorm") or "auto")
        if batchnorm not in BATCHNORM:
            raise ConfigError(f"model.batchnorm={batchnorm!r} is not allowed: one of {', '.join(BATCHNORM)}")
        lora = dict(node.get("lora") or {})
        for key in lora:
            if key not in LORA_KEYS:
                raise ConfigError(f"model.lora.{key} is not allowed: model.lora takes {', '.join(LORA_KEYS)}")
        pin = node.get("checkpoint_sha256") or None
        if pin is not None:
            pin = str(pin).lower()
            if not (len(pin) == 64 and set(pin) <= set("0123456789abcdef")):
                given = node.get("checkpoint_sha256")
                raise ConfigError(f"model.checkpoint_sha256={given!r} is not allowed: 64 hex digits")
            if path is None:
                raise ConfigError("model.checkpoint_sha256 is not allowed without model.checkpoint_path: it pins it")
        spec = cls(str(path) if path else None, bool(node.get("pretrained") or False), trainable, batchnorm, lora, pin)
        if trainable == "lora":
            spec.lora_config()  # checks r, alpha, dropout and that peft is installed
        return spec

    @property
    def loads_weights(self) -> bool:
        return self.checkpoint_path is not None or self.pretrained

    def lora_config(self) -> dict[str, Any]:
        r, alpha, dropout = self.lora.get("r", 8), self.lora.get("alpha", 16), self.lora.get("dropout", 0.0)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError(f"model.lora.r={r!r} is not allowed: a positive integer (the adapters' rank)")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:  # NaN <= 0 is False
            raise ConfigError(f"model.lora.alpha={alpha!r} is not allowed: a finite number > 0 (scale = alpha / r)")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"model.lora.dropout={dropout!r} is not allowed: in [0, 1)")
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError(
                "model.trainable='lora' is not allowed: peft is not installed; pip install 'aisec-train[finetune]'"
            ) from None
        targets = self.lora.get("target_modules")
        targets = list(targets) if isinstance(targets, (list, tuple)) else targets
        return {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "target_modules": targets}


def split(node: dict[str, Any] | None) -> tuple[dict[str, Any], FineTune]:
    """(the constructor's config, the fine-tuning keys); ``pretrained`` stays with a target that takes it (timm)."""
    node = dict(node or {})
    tune = {k: node.pop(k) for k in KEYS if k in node}
    return node, FineTune.parse(tune)


# ---- weights -----------------------------------------------------------------------------------------------
def provenance(path: str, sha256: str | None) -> str:
    """How the base weights were verified before loading, for the report (``model.checkpoint_verified``)."""
    if Path(path).with_name(Path(path).name + ".tag").exists():
        return "keyed tag verified (an aisec-train artifact)" + (" and SHA-256 pinned" if sha256 else "")
    if sha256:
        return "SHA-256 pinned by model.checkpoint_sha256"
    return "not verified: no keyed tag and no model.checkpoint_sha256 (a third-party file is taken as it is)"


def read_state_dict(path: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (see :func:`read_weights`, which also gives the digest to report)."""
    return read_weights(path, sha256)[0]


def read_weights(path: str, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(the tensors of a checkpoint file, unwrapped from trainer dicts and wrapper prefixes; the SHA-256 of exactly
    the bytes they were parsed from). The file is read once, so its keyed tag (when it has one), the ``sha256`` pin
    and the report's ``model.checkpoint_sha256`` all vouch for what was loaded: hashed again by path, a file
    swapped after the read was reported as the weights trained from."""
    file = Path(path)
    if file.with_name(file.name + ".tag").exists():  # an aisec-train artifact: its keyed tag must verify
        from aisec_train.train import checkpoint

        try:
            data = checkpoint.read_verified(file, root=file.parent)
        except checkpoint.CheckpointError as err:
            raise ConfigError(f"model.checkpoint_path={path!r} is not allowed: {err}") from None
    else:
        try:
            data = file.read_bytes()
        except OSError as err:
            raise ConfigError(f"model.checkpoint_path={path!r} cannot be read ({err.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ConfigError(
            f"model.checkpoint_path={path!r} is not allowed: its SHA-256 is {digest}, model.checkpoint_sha256 pins "
            f"{sha256}; refusing changed weights"
        )
    try:
        with warnings.catch_warnings():  # torch warns (two stderr lines) on a plain pickle's protocol, then refuses it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            payload: Any = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged or pickled-code file: one line, no traceback
        raise ConfigError(
            f"model.checkpoint_path={path!r} cannot be loaded as weights only ({_load_failure(err)})"
        ) from None
    while isinstance(payload, dict) and not _is_state(payload):
        inner = next((payload[k] for k in WRAPPER_KEYS if isinstance(payload.get(k), dict)), None)
        if inner is None:
            raise ConfigError(
                f"model.checkpoint_path={path!r} holds no state dict (keys {sorted(payload)[:6]}); expected tensors "
                f"or one of {', '.join(WRAPPER_KEYS)}"
            )
        payload = inner
    if not isinstance(payload, dict):
        raise ConfigError(f"model.checkpoint_path={path!r} holds a {type(payload).__name__}, not a state dict")
    return _strip_prefixes({k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}), digest


def _load_failure(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused, in a few words. Torch's own text opens with advice to re-run
    with ``weights_only=False`` (which runs whatever code the file holds); cut at 200 characters, that advice was
    all the refusal said, without the caveat or what was refused (``GLOBAL posix.system``), so keep only the latter."""
    text = " ".join(str(err).split())
    if text.startswith("Weights only load failed."):
        detail = text.split("trusted source.", 1)[-1].split("Check the documentation of torch.load", 1)[0]
        detail = detail.split("WeightsUnpickler error:", 1)[-1].strip() or "unknown reason"
        return f"only tensors and plain containers are read, never a pickle that could run code: {detail}"[:300]
    return text[:200] or type(err).__name__  # an empty file: EOFError, no text


def _is_state(payload: dict) -> bool:
    return bool(payload) and all(isinstance(v, torch.Tensor) for v in payload.values())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.``, Opacus' ``_module.`` and aisec-train's input-normalisation wrapper (``net.``)."""
    if {"mean", "std"} <= set(state) and all(k.startswith("net.") for k in state if k not in ("mean", "std")):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    for prefix in ("module.", "_module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def head_name(net: nn.Module) -> str | None:
    """The classifier: timm's ``get_classifier()``, else the last Linear (or last 1x1 Conv2d) in module order."""
    get = getattr(net, "get_classifier", None)
    if callable(get):
        found = get()
        if isinstance(found, nn.Module):
            name = next((n for n, m in net.named_modules() if m is found), None)
            if name and any(True for _ in found.parameters()):
                return name
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear) or isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            last = name
    return last


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], path: str) -> list[str]:
    """Copy ``state`` into ``net``; the head keeps its fresh initialisation where its shape differs (another class
    count). Returns the re-initialised layers; anything else that does not fit is refused in one line."""
    own = net.state_dict()
    head = head_name(net)

    def in_head(key: str) -> bool:
        return head is not None and (key == head or key.startswith(head + "."))

    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    wrong = [k for k in mismatched if not in_head(k)]
    if wrong:
        raise ConfigError(
            f"model.checkpoint_path={path!r} does not fit this model: {wrong[0]} is {tuple(state[wrong[0]].shape)} "
            f"in the file, {tuple(own[wrong[0]].shape)} in the model ({len(wrong)} such tensor(s) outside the head "
            f"{head!r})"
        )
    if [k for k in missing if not in_head(k)] or unexpected:
        odd = ([f"missing {k}" for k in missing if not in_head(k)] + [f"unexpected {k}" for k in unexpected])[:2]
        raise ConfigError(
            f"model.checkpoint_path={path!r} does not fit this model ({'; '.join(odd)}): is it the same architecture?"
        )
    for key in (k for k in own if k in state and k not in mismatched):
        # load_state_dict casts silently: complex weights lose their imaginary part, NaN or inf start every
        # step (and the privacy budget it is charged) at non-finite weights
        loaded, mine = state[key], own[key]
        if mine.is_floating_point() and not loaded.is_floating_point():
            raise ConfigError(
                f"model.checkpoint_path={path!r} does not fit this model: {key} is {loaded.dtype} in the file, "
                f"{mine.dtype} in the model; expected floating-point weights"
            )
        if loaded.is_floating_point() and not bool(torch.isfinite(loaded).all()):
            raise ConfigError(
                f"model.checkpoint_path={path!r} is not allowed: {key} holds NaN or inf; every weight must be finite"
            )
    net.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)
    return sorted({k.rsplit(".", 1)[0] for k in mismatched + [k for k in missing if in_head(k)]})


# ---- BatchNorm -------------------------------------------------------------------------------------------------
class FrozenBatchNorm(nn.Module):
    """A pretrained BatchNorm as a fixed affine map: its running statistics are constants, so no record's output
    depends on another record in the batch (DP-safe), and nothing here is trained.

    timm's norm-act layers (``BatchNormAct2d``: EfficientNet, MobileNetV3, RegNet) are BatchNorms that also apply
    their ``drop`` and ``act`` modules; those are kept, in that order. Dropped, the frozen network silently lost
    every activation of those layers and fine-tuned a different function from the checkpoint's."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        n = bn.num_features
        self.eps = bn.eps
        self.register_buffer("weight", bn.weight.detach().clone() if bn.weight is not None else torch.ones(n))
        self.register_buffer("bias", bn.bias.detach().clone() if bn.bias is not None else torch.zeros(n))
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.drop = bn.drop if isinstance(getattr(bn, "drop", None), nn.Module) else nn.Identity()
        self.act = bn.act if isinstance(getattr(bn, "act", None), nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


def freeze_batchnorm(net: nn.Module) -> list[str]:
    """Replace every BatchNorm that tracks running statistics by a :class:`FrozenBatchNorm`; the names replaced."""
    replaced = []
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            _check_known_forward(name, module)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, FrozenBatchNorm(module))
            replaced.append(name)
    return replaced


def _check_known_forward(name: str, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Refuse to freeze a BatchNorm subclass whose forward does more than :class:`FrozenBatchNorm` reproduces."""
    own_forward = type(bn).forward is not nn.modules.batchnorm._BatchNorm.forward
    norm_act = isinstance(getattr(bn, "act", None), nn.Module) and isinstance(getattr(bn, "drop", None), nn.Module)
    if own_forward and not norm_act:
        raise ConfigError(
            f"model.batchnorm='freeze' is not allowed for {name!r} ({type(bn).__name__}): its forward is its own, "
            "so a frozen copy would compute another function; replace it in the model (nn.BatchNorm2d or GroupNorm)"
        )


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


# ---- what trains -----------------------------------------------------------------------------------------------
def select_trainable(net: nn.Module, trainable: str, head: str | None, fresh: list[str] | None = None) -> None:
    """``requires_grad=False`` on everything ``trainable`` does not name (``lora``: see :func:`add_lora`).

    With ``head`` and ``lora`` the re-initialised layers (``fresh``) train with the head: a layer the checkpoint
    lacks (DistilBERT's ``pre_classifier`` beside its ``classifier``) otherwise stayed frozen at random weights."""
    if trainable == "all":
        return
    if trainable in ("head", "lora") and head is None:
        raise ConfigError(f"model.trainable={trainable!r} is not allowed: this model has no Linear classifier head")
    for name, param in net.named_parameters():
        if trainable in ("head", "lora"):
            param.requires_grad_(_under(name, [head, *(fresh or [])]))
        else:
            param.requires_grad_(re.search(trainable, name) is not None)
    if not any(p.requires_grad for p in net.parameters()):
        names = ", ".join(n for n, _ in list(net.named_parameters())[:4])
        raise ConfigError(f"model.trainable={trainable!r} matches no parameter (names look like {names}, ...)")
    _check_fresh_layers_train(net, trainable, fresh or [])


def _check_fresh_layers_train(net: nn.Module, trainable: str, fresh: list[str]) -> None:
    """A REGEX that leaves a re-initialised layer frozen is refused: that layer (a head resized for another class
    count) holds random weights, and the run trained the body under a random fixed head while the report said
    fine-tuned. Refused rather than trained silently: a pattern says exactly what trains (the report and federated
    clients' shared tensors are that list), and the fix is one override, which the line gives."""
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad and _under(n, fresh)]
    if not frozen:
        return
    layers = [layer for layer in fresh if any(_under(n, [layer]) for n in frozen)]
    fix = "|".join([trainable, *(re.escape(layer) for layer in layers)])
    raise ConfigError(
        f"model.trainable={trainable!r} is not allowed: it leaves the re-initialised (random) layer(s) "
        f"{', '.join(layers)} frozen ({', '.join(frozen)}), so the model would train under a random head; allowed: "
        f"a pattern that also matches them (model.trainable='{fix}'), or head, lora or all"
    )


def _under(name: str, layers: list[str]) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in layers)


def add_lora(
    net: nn.Module, spec: FineTune, head: str | None, device: torch.device | str, fresh: list[str] | None = None
) -> nn.Module:
    """LoRA adapters injected by peft; the base is frozen, the adapters, the head and the re-initialised layers
    (``fresh``: no pretrained weights to adapt) train.

    The model is on ``device`` before peft wraps it: moved afterwards, Opacus' optimizer can hold the adapters'
    old tensors and they silently never train (opacus#820); :func:`check_adapters_moved` guards the release.
    """
    from peft import LoraConfig, get_peft_model

    options = spec.lora_config()
    if options["target_modules"] is None:
        whole = [head, *(fresh or [])] if head else list(fresh or [])

        def in_head(name: str) -> bool:
            return _under(name, whole)

        layers = (nn.Linear, nn.Conv2d)
        # grouped (depthwise) convolutions are left out: peft adapts one only when the rank divides its groups
        options["target_modules"] = [
            n for n, m in net.named_modules()
            if isinstance(m, layers) and n and not in_head(n) and getattr(m, "groups", 1) == 1
        ]  # fmt: skip
    if not options["target_modules"]:
        raise ConfigError("model.trainable='lora' is not allowed: the model has no Linear or Conv2d layer to adapt")
    # A rank beyond a layer's min(in, out) adds nothing (B @ A cannot exceed it) and peft allocates it all: r=1e8
    # on a 32-wide BERT was killed for memory (exit 137) instead of refused.
    widest = max((_full_rank(m) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), default=0)
    if options["r"] > widest:
        raise ConfigError(
            f"model.lora.r={options['r']} is not allowed: at most {widest} for this model (the largest min(in, out) "
            "of its Linear / Conv2d layers: a higher rank adds nothing)"
        )
    net = net.to(device)
    try:
        wrapped = get_peft_model(net, LoraConfig(**options))
    except (ValueError, TypeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"model.lora.target_modules={options['target_modules']!r} is not allowed: {reason}") from None
    inner = wrapped.get_base_model()  # the user's network with adapters injected: Opacus wraps a plain module
    whole = [head, *(fresh or [])] if head is not None else list(fresh or [])
    for name, param in inner.named_parameters():
        if _under(name, whole):
            param.requires_grad_(True)
    return inner


def _full_rank(layer: nn.Linear | nn.Conv2d) -> int:
    """The rank of the layer's weight as a matrix: min(in, out), a convolution's input being its patch."""
    if isinstance(layer, nn.Linear):
        return min(layer.in_features, layer.out_features)
    patch = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    return min(patch, layer.out_channels)


def check_private_adapters(net: nn.Module) -> None:
    """Under DP, refuse (before any step) a LoRA layer whose adapters Opacus cannot clip per sample.

    peft's Linear and Conv adapters are plain ``nn.Linear`` / ``nn.Conv*`` modules that run in the layer's forward,
    so every grad-sample mode sees them. Its Embedding adapter keeps its weights in ``ParameterDict``s used through
    ``F.embedding`` and its MultiheadAttention adapter merges them into the attention weights: no per-sample
    gradient would ever reach them, and Opacus fails at the first step (after the ledger was opened)."""
    from peft.tuners.lora import layer as lora_layer

    clippable = (lora_layer.Linear, lora_layer.Conv1d, lora_layer.Conv2d, lora_layer.Conv3d)
    for name, module in net.named_modules():
        if isinstance(module, lora_layer.LoraLayer) and not isinstance(module, clippable):
            base = type(module.get_base_layer()).__name__
            raise ConfigError(
                f"model.lora.target_modules is not allowed to include {name!r} ({base}) with privacy=dpsgd: peft's "
                f"LoRA adapter on {base} layers is no Linear or Conv module, so Opacus cannot clip its per-sample "
                "gradients; allowed: Linear and Conv layers (in a transformer: query, key, value, dense)"
            )


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA's B matrices (peft starts them at zero, so a trained adapter has a non-zero B)."""
    return {n: p for n, p in model.named_parameters() if "lora_B" in n}


def check_adapters_moved(model: nn.Module) -> dict[str, Any] | None:
    """None without LoRA; else the adapters' summary, or a refusal when every B matrix is still exactly zero."""
    found = adapters(model)
    if not found:
        return None
    moved = sum(bool(p.detach().abs().sum() > 0) for p in found.values())
    if moved == 0:
        raise ConfigError(
            f"model.trainable='lora' trained nothing: all {len(found)} LoRA B matrices are still at their initial "
            "zeros (adapters detached from the optimizer?); the model is not released"
        )
    return {"adapters": len(found), "moved": moved}


def parameter_counts(net: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "total_parameters": total}
