"""Training: the one loop, its callbacks and objectives, the three trainers, checkpoints, precision and launch.

The Python API's function on a DataLoader is ``aisec_train.fit(model, loader, config)`` (aisec_train/api.py), not
this package: a package is a module, and making a module callable needs its class swapped at import time.
"""
