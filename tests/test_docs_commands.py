"""What the documentation's commands promise, checked as a user would meet them (docs audit)."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import aisec_train


def test_the_python_api_silences_the_accountants_divide_by_zero_at_sample_rate_one(monkeypatch):
    """docs/checklist.md: at sample rate 1 Opacus' PRV accountant warns "divide by zero" several times per epsilon;
    the CLI silences it (aisec_train/quiet.py). The README's `aisec_train.fit` / `run` flooded a notebook with it."""
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # restored after the test
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(16, 1, 4, 4, generator=g), torch.arange(16) % 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    loader = DataLoader(data, batch_size=16)  # the batch is the whole training set: sample rate 1
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = aisec_train.fit(model, loader, ["train.epochs=1", "privacy.noise_multiplier=4.0"])
    assert result.ledger is not None and result.ledger.epsilon() > 0
    divide = [w for w in seen if "divide by zero" in str(w.message)]
    assert not divide, f"{len(divide)} divide-by-zero warning(s) reached the caller"
