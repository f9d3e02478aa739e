"""Training: the one loop, its callbacks and objectives, the three trainers, DP-SGD and the privacy ledger.

This package is also the Python API's ``aisec_train.train(model, loader, config)`` (aisec_train/api.py): the
package object is callable, so ``aisec_train.train`` can be the documented function and the package at once
(``from aisec_train.train import checkpoint`` and ``aisec_train.train(model, loader)`` both work).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from aisec_train.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
