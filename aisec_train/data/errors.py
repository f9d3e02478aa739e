"""The data package's refusal: data that is missing, malformed, tampered with or unusable for training."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be used: missing, malformed, tampered or unusable for training."""
