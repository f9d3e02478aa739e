"""aisec-train: privacy-preserving, attack-hardened training for PyTorch.

The Python API (aisec_train/api.py): ``compose`` a config from Hydra overrides, ``run`` the whole pipeline on your
own model and datasets, or ``train`` a model on a DataLoader with the one training loop. They load lazily, so the
small commands (``aisec-train-registry``, ``aisec-train-ledger``) never import torch.
"""

__version__ = "0.2.0"
__all__ = ["compose", "run", "train", "__version__"]


def __getattr__(name: str):
    if name in ("compose", "run"):
        from aisec_train import api

        return getattr(api, name)
    if name == "train":  # the subpackage aisec_train.train, which is also callable as api.train (train/__init__.py)
        import aisec_train.train

        return aisec_train.train
    raise AttributeError(f"module 'aisec_train' has no attribute {name!r}")
