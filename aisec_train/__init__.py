"""aisec-train: privacy-preserving, attack-hardened training for PyTorch.

The Python API (aisec_train/api.py): ``compose`` a config from Hydra overrides, ``run`` the whole pipeline on
your own model and datasets, or ``train`` a model on a DataLoader with the one training loop.
"""

__version__ = "0.2.0"

from aisec_train.api import compose, run, train  # noqa: E402

__all__ = ["compose", "run", "train", "__version__"]
