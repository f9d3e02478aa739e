"""aisec-train: privacy-preserving, attack-hardened training for PyTorch."""

__version__ = "0.1.0"
