"""aisec-train: privacy-preserving, attack-hardened training for PyTorch.

The Python API (aisec_train/api.py): ``compose`` a config from Hydra overrides, ``run`` the whole pipeline on your
own model and datasets, or ``fit`` a model on a DataLoader with the one training loop. They load lazily, so the
small commands (``aisec-train-registry``, ``aisec-train-ledger``) never import torch.

``fit`` is not called ``train`` because ``aisec_train.train`` is the training package (``from aisec_train.train
import checkpoint``): Python's import system binds that name to the package whenever it is first imported, so a
function of the same name could only stay callable through a module-class swap.
"""

__version__ = "0.2.0"
__all__ = ["compose", "run", "fit", "__version__"]


def __getattr__(name: str):
    if name in ("compose", "run", "fit"):
        from aisec_train import api

        return getattr(api, name)
    raise AttributeError(f"module 'aisec_train' has no attribute {name!r}")
