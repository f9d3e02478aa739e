"""Flower federated training (DP-SGD clients) with plaintext or CKKS-encrypted FedAvg: docs/federated.md."""
