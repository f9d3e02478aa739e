"""What a client accepts from the server: nothing it sends is acted on until it fits this client's own job.

Everything that sets a client's training and privacy (epochs, learning rate, batch size, DP parameters, the
aggregation mode) comes from its own pinned ``job.json``, never from a message. What the server does choose is
checked here against that job before any work: the global model (plaintext arrays of the template's keys, shapes
and dtypes, finite; under CKKS an aggregate that decrypts to the model's length), the round number (1 to
``federated.rounds``), under client-level DP the cohort (1 to ``federated.clients``: a larger one shrinks every
noise share towards nothing) and the clip norm an adaptive aggregate carries. A refusal is one line
(:class:`UntrustedMessage`); the ClientApp answers it with an error reply, having trained nothing and spent no
budget. What a malicious server can still do is listed in docs/federated.md ("What a client trusts the server
with").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from aisec_train.errors import Refusal
from aisec_train.federated.client_level import EXTRA, EXTRA_KEYS, ClientDPPlan, decode


class UntrustedMessage(Refusal, ValueError):
    """A value the server sent that this client's job does not allow: the round's reply is an error, nothing ran."""


def _require(ok: bool, what: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UntrustedMessage(f"the server sent {what}={value!r}: {allowed}; refusing the message")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def records(content: RecordDict) -> None:
    """A train or evaluate message holds the global model (``arrays``) and the round's settings (``config``)."""
    kinds = {"arrays": ArrayRecord, "config": ConfigRecord}
    got = {k: type(content.get(k)).__name__ for k in kinds}
    ok = all(isinstance(content.get(k), t) for k, t in kinds.items())
    _require(ok, "records", got, "must be arrays: ArrayRecord and config: ConfigRecord")


def server_round(config: Any, rounds: int) -> int:
    """The round a train message names: an integer in [1, rounds] (it picks the CKKS epoch key and the seeds)."""
    rnd = config.get("server-round")
    _require(_is_int(rnd) and 1 <= rnd <= rounds, "server-round", rnd, f"must be an integer in [1, {rounds}]")
    return rnd


def cohort(config: Any, clients: int) -> int:
    """The cohort a DP-FedAvg client sizes its noise share by (``z C / sqrt(cohort - tolerance)``): at most the
    federation, or a server claiming a huge cohort would receive each clipped update with almost no noise."""
    m = config.get("cohort")
    _require(_is_int(m) and 1 <= m <= clients, "cohort", m, f"must be an integer in [1, federated.clients={clients}]")
    return m


def clip_norm(vector: np.ndarray, num_params: int, plan: ClientDPPlan) -> float:
    """This round's clip norm: the configured ``C``, or under adaptive clipping the one derived from the ``C`` and the
    count the aggregate carries, which must be finite and > 0 (it sizes the clip and the noise share)."""
    if plan.adaptive and vector.size > num_params:
        carried = float(vector[num_params + 1])
        _require(math.isfinite(carried) and carried > 0, "clip norm", carried, "must be a finite number > 0")
    try:
        clip = decode(vector, num_params, plan)[1]
    except OverflowError:  # exp() of a count no noisy sum of bits reaches
        clip = math.inf
    _require(math.isfinite(clip) and clip > 0, "a count giving the clip norm", clip, "must give a finite number > 0")
    return clip


def plain_state(record: ArrayRecord, template: dict[str, torch.Tensor], extras: bool) -> tuple[dict, np.ndarray]:
    """A plaintext global model as the template's tensors, and the DP extras (allowed only when ``extras``).

    Keys, shapes and dtypes are the template's and every value is finite: a NaN model would spend a round of
    privacy budget on training that can only fail, and a wrong shape used to raise out of ``load_state_dict``.
    The declared shape is checked before the bytes are read (numpy allocates what an array's header claims).
    """
    keys, model = set(record.keys()), set(template)
    ok = keys == model or (extras and keys == model | set(EXTRA_KEYS))
    odd = {"missing": sorted(model - keys), "unknown": sorted(keys - model - (set(EXTRA_KEYS) if extras else set()))}
    allowed = f"must be the model's {len(model)} arrays" + (f" (+ {list(EXTRA_KEYS)})" if extras else "")
    _require(ok, "arrays", odd, allowed)
    state, extra = {}, {}
    for key in record.keys():
        ref = template.get(key, torch.zeros(1, dtype=torch.float64))  # an extra: one float64 value
        want = (tuple(ref.shape), str(ref.dtype).removeprefix("torch."))
        arr = record[key]
        declared = (tuple(arr.shape), arr.dtype)
        _require(declared == want, f"{key} of shape, dtype", declared, f"must be {want}")
        try:
            value = arr.numpy()
        except (ValueError, MemoryError) as err:  # its bytes' own header disagrees with the declared shape
            raise UntrustedMessage(f"the server sent {key}, whose bytes do not load ({err}); refusing it") from err
        got = (tuple(value.shape), str(value.dtype))
        _require(got == want, f"{key} of shape, dtype", got, f"must be {want}")
        if not np.isfinite(value).all():
            raise UntrustedMessage(f"the server sent a global model whose {key} holds NaN or inf; refusing the message")
        (state if key in template else extra)[key] = value
    ordered = {k: torch.from_numpy(state[k]) for k in template}  # the template's order: flatten() depends on it
    return ordered, np.array([float(extra[k][0]) for k in EXTRA_KEYS if k in extra])


def decrypted(vector: np.ndarray, num_params: int, extras: bool) -> np.ndarray:
    """A decrypted aggregate: the model's length (plus the DP extras when ``extras``) and finite."""
    sizes = (num_params, num_params + EXTRA) if extras else (num_params,)
    _require(vector.size in sizes, "an aggregate of length", vector.size, f"must be one of {list(sizes)}")
    if not np.isfinite(vector).all():
        raise UntrustedMessage("the server sent an aggregate that decrypts to NaN or inf; refusing the message")
    return vector
