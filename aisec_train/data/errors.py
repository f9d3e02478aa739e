"""The data package's refusal: data that is missing, malformed, tampered with or unusable for training."""

from __future__ import annotations

from aisec_train.errors import Refusal


class DataError(Refusal, ValueError):
    """Data that cannot be used: missing, malformed, tampered or unusable for training."""
