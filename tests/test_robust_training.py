"""Adversarial training inside the one training loop, composed with DP-SGD, and its presets on the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.data.views import Sample, materialize
from aisec_train.models import build_model
from aisec_train.train.config import Accountant, GradSampleMode, PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.train.loop import train
from aisec_train.train.objectives import Adversarial
from tests.conftest import read_report, run_cli

CLIP, LR = 0.1, 0.5


def flip(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in adversary: any function of the batch the loop must train on instead."""
    return 1.0 - x


@pytest.mark.parametrize("mode", [GradSampleMode.hooks, GradSampleMode.ghost])
def test_dp_step_clips_the_adversarial_examples_per_sample_gradients(mode):
    x, y = materialize(load_dataset(DatasetConfig(name="synthetic", n_samples=60), seed=0).train, limit=32)
    batch = Sample(x, y)
    torch.manual_seed(0)
    base = build_model("cnn", in_channels=1, num_classes=10, image_size=8)

    # The loop: one full-batch DP step (Poisson sampling at rate 1 keeps every sample, negligible noise).
    ours = copy.deepcopy(base)
    privacy = PrivacyConfig(
        noise_multiplier=1.0,
        target_epsilon=None,
        max_grad_norm=CLIP,
        accountant=Accountant.rdp,
        grad_sample_mode=mode,
    )
    privacy.noise_multiplier = 1e-9  # below the config's floor on purpose: the step must equal the noiseless one
    cfg = TrainConfig(epochs=1, batch_size=32, max_physical_batch_size=32, lr=LR, momentum=0.0, ema_decay=0.0)
    train(
        ours,
        batch,
        train_cfg=cfg,
        privacy_cfg=privacy,
        device=torch.device("cpu"),
        objective=Adversarial("flip", flip),
        progress=False,
    )

    # The reference: Opacus directly, on the adversarial examples.
    ref = copy.deepcopy(base)
    optimizer = torch.optim.SGD(ref.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(batch.x, batch.y), batch_size=32)
    kw = dict(noise_multiplier=0.0, max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode=mode.value)
    wrapped = PrivacyEngine().make_private(
        module=ref, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(), **kw
    )
    model, optimizer, criterion = wrapped[0], wrapped[1], wrapped[2] if mode.value == "ghost" else nn.CrossEntropyLoss()
    optimizer.zero_grad()
    criterion(model(flip(model, batch.x, batch.y)), batch.y).backward()
    optimizer.step()

    moved = any(not torch.allclose(p, q) for p, q in zip(base.parameters(), ours.parameters(), strict=True))
    assert moved
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach(), atol=1e-6, rtol=1e-5)


def test_presets_compose_with_dp_on_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=smoke", "robustness=fgsm_rs", "audit=off", "robustness.eval_samples=64", f"hydra.run.dir={run_dir}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(run_dir)
    assert report["train"]["adversarial_training"] == "fgsm_rs" and report["robustness"]["training"] == "fgsm_rs"
    assert report["train"]["adversarial_attack"]["steps"] == 1  # what FGSM-RS ran, not robustness.steps (7)
    assert report["privacy"]["epsilon"] <= 3.0
    # eps: null resolved to digits' default radius; the evaluation attack is stronger than the training one.
    attack = report["robustness"]["attack"]
    assert attack["name"] == "apgd" and attack["eps"] == pytest.approx(0.1)  # APGD-CE + APGD-T by default
    evaluation = report["robustness"]["eval"]
    assert evaluation["suite"] == "apgd" and {"apgd-ce", "apgd-t"} <= set(evaluation)
    assert evaluation["apgd-t"]["robust_accuracy"] == pytest.approx(report["robustness"]["robust_accuracy"], abs=0.02)
    evasion = [c for c in report["checklist"] if c["item"] == "tested against evasion attacks"]
    assert evasion and evasion[0]["status"] == "pass" and "robust accuracy" in evasion[0]["evidence"]


def test_privacy_mode_none_is_unaffected_by_the_adversary_plumbing():
    data = load_dataset(DatasetConfig(name="synthetic", n_samples=60), seed=0).train
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, num_classes=10, image_size=8)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, ema_decay=0.0)
    seen = []

    def recording(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x

    result = train(
        model,
        data,
        train_cfg=cfg,
        privacy_cfg=PrivacyConfig(mode=PrivacyMode.none),
        device=torch.device("cpu"),
        objective=Adversarial("recording", recording),
        progress=False,
    )
    assert result.ledger is None and sum(seen) == len(data)
