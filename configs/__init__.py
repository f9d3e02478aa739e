"""Hydra configuration tree (installed as ``aisec_train.configs``)."""
