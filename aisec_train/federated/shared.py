"""Federated fine-tuning: which tensors travel when ``model.trainable`` freezes part of the model.

Every client and the server build the same initial model (the checkpoint, the seed, the same LoRA injection),
so the frozen part is already identical everywhere and never needs to be sent. Only the trainable tensors
(``requires_grad`` parameters, plus the buffers of modules that own one, e.g. a trainable BatchNorm's running
statistics) are sent, aggregated (plaintext FedAvg or CKKS) and saved in the server's round state; the global
model is that subset merged into the frozen base (:func:`merge`). With everything trainable the whole state
dict travels, as before (``keys`` is None).

The report's ``federated`` section gets ``trained_parameters``, ``bytes_per_round`` (what the clients uploaded,
mean over rounds) and ``bytes_per_round_full_model`` (the same clients sending the whole model: exact for
plaintext, from the ciphertext count for CKKS).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from aisec_train.crypto.ckks import EncryptedUpdate
from aisec_train.federated.cohorts import upload_sizes


def shared_keys(model: nn.Module) -> list[str] | None:
    """The state-dict keys that train (in state-dict order), or None when everything trains."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return None
    owners = {name for name, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    keys = []
    for key in model.state_dict():
        owner = key.rpartition(".")[0]
        if key in params and params[key].requires_grad or key not in params and owner in owners:
            keys.append(key)
    return keys


def restrict(state: dict[str, torch.Tensor], keys: list[str] | None) -> dict[str, torch.Tensor]:
    return dict(state) if keys is None else {k: state[k] for k in keys}


def merge(model: nn.Module, state: dict[str, torch.Tensor], keys: list[str] | None) -> nn.Module:
    """``state`` (the travelling tensors) loaded into ``model`` (the frozen base); nothing else may be in it."""
    if keys is None:
        model.load_state_dict(state)
        return model
    extra = sorted(set(state) - set(keys))
    missing = sorted(set(keys) - set(state))
    if extra or missing:  # a state saved under another model.trainable (a resume with changed overrides)
        raise ValueError(
            f"the federated global state does not match model.trainable: {len(missing)} trainable tensor(s) "
            f"missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    model.load_state_dict(state, strict=False)
    return model


def summary(model: nn.Module, keys: list[str] | None, rows: list[dict[str, Any]], ckks_slots: int | None):
    """``federated`` report values: what travelled per round against the whole model."""
    full = model.state_dict()
    sent = restrict(full, keys)
    trained = sum(v.numel() for v in sent.values())
    total = sum(v.numel() for v in full.values())
    uploads = [sizes for row in rows if (sizes := upload_sizes(row))]  # under dp=client, means: ids name the cohort
    per_client = [b for r in uploads for b in r]
    out: dict[str, Any] = {
        "trainable": "all" if keys is None else "subset",
        "trained_parameters": trained,
        "full_model_values": total,  # state-dict values (buffers too)
        "tensors_sent": len(sent),
        "tensors_total": len(full),
        "bytes_per_round": sum(map(sum, uploads)) / len(uploads) if uploads else None,
        "bytes_per_client_upload": sum(per_client) / len(per_client) if per_client else None,
    }
    if ckks_slots:  # ciphertexts per upload scale with ceil(values / slots); the extras ride in the last one
        header = EncryptedUpdate._HEADER.size

        def chunks(n: int) -> int:
            return max(1, math.ceil(n / ckks_slots))

        ratio = lambda b: header + (b - header) * chunks(total) / chunks(trained)  # noqa: E731
        how = "estimated: the measured bytes per ciphertext x the ciphertexts a whole-model vector needs"
    else:
        full_bytes = _record_bytes(full)
        sent_bytes = _record_bytes(sent)
        ratio = lambda b: b - sent_bytes + full_bytes  # noqa: E731 - extras (DP-FedAvg's two values) kept as sent
        how = "exact: the same Flower ArrayRecord built from the whole state dict"
    out["bytes_per_round_full_model"] = sum(sum(map(ratio, r)) for r in uploads) / len(uploads) if uploads else None
    out["bytes_per_client_upload_full_model"] = sum(map(ratio, per_client)) / len(per_client) if per_client else None
    out["bytes_full_model_method"] = how
    if out["bytes_per_round"] and out["bytes_per_round_full_model"]:
        out["bytes_fraction_of_full_model"] = out["bytes_per_round"] / out["bytes_per_round_full_model"]
    return out


def _record_bytes(state: dict[str, torch.Tensor]) -> int:
    """What the client app counts as upload bytes for a plaintext record of ``state``."""
    record = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
    return sum(len(a.data) for a in record.values())
