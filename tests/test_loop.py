"""The one training loop: callbacks (schedule, numeric health, weight averaging), objectives, Poisson sampling
over streamed datasets, and the fine-tuning / surrogate loops it replaced."""

from __future__ import annotations

import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch import nn

from aisec_train.data.views import Sample, Transformed, subset
from aisec_train.models import build_model
from aisec_train.privacy.engine import make_private
from aisec_train.privacy.ledger import PrivacyLedger
from aisec_train.privacy.randomness import secret_generator
from aisec_train.train.callbacks import Callback, NonFiniteError
from aisec_train.train.config import PrivacyConfig, TrainConfig
from aisec_train.train.loop import train
from aisec_train.train.objectives import SoftTargets

CPU = torch.device("cpu")


def blobs(n=96, classes=3, seed=0) -> Sample:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (torch.rand(n, 1, 6, 6, generator=g) * 0.4 + y[:, None, None, None] * 0.25).clamp(0, 1)
    return Sample(x, y)


class LrLog(Callback):
    def __init__(self):
        self.lrs = []

    def after_step(self, loop) -> None:
        self.lrs.append(loop.base_optimizer.param_groups[0]["lr"])


def test_a_cosine_schedule_spans_the_planned_steps():
    log = LrLog()
    model = build_model("mlp", in_channels=1, num_classes=3, image_size=6)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.2, ema_decay=0.0)
    train(model, blobs(), train_cfg=cfg, device=CPU, callbacks=[log], progress=False,
          scheduler={"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR"})  # fmt: skip
    assert len(log.lrs) == 9 and log.lrs[0] < 0.2 and log.lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(log.lrs, log.lrs[1:], strict=False))  # T_max was filled with the 9 steps


def test_a_diverging_run_stops_at_once_and_persists_nothing_non_finite():
    saved = []
    model = build_model("mlp", in_channels=1, num_classes=3, image_size=6)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e38, momentum=0.0, ema_decay=0.0)
    with pytest.raises(NonFiniteError, match="training stopped: the loss became"):
        train(model, blobs(), train_cfg=cfg, device=CPU, persist=saved.append, progress=False)
    assert all(torch.isfinite(v).all() for payload in saved for v in payload["model"].values())


def test_poisson_sampling_holds_over_a_streamed_augmented_subset():
    data = Transformed(subset(blobs(200), range(0, 200, 2)), lambda x: x.flip(-1))
    model = build_model("cnn", in_channels=1, num_classes=3, image_size=6)
    loader = torch.utils.data.DataLoader(data, batch_size=20)
    ledger = PrivacyLedger("rdp", 1e-5)
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                      PrivacyConfig(target_epsilon=2.0), ledger=ledger, epochs=1,
                      noise_generator=secret_generator())  # fmt: skip
    assert isinstance(dp.loader, DPDataLoader) and ledger.sample_rate == pytest.approx(20 / 100)
    sizes = [len(y) for _, y in dp.loader]
    assert len(set(sizes)) > 1  # independent per-sample coins: the batch size varies


def test_soft_targets_objective_distils_through_the_same_loop():
    data = blobs(90)
    soft = torch.nn.functional.one_hot(data.y, 3).float() * 0.9 + 0.1 / 3
    model = build_model("mlp", in_channels=1, num_classes=3, image_size=6)
    cfg = TrainConfig(epochs=15, batch_size=30, lr=3e-3, ema_decay=0.0)
    result = train(model, Sample(data.x, soft), train_cfg=cfg, device=CPU, objective=SoftTargets(), progress=False,
                   optimizer={"_target_": "torch.optim.Adam", "lr": 3e-3})  # fmt: skip
    assert result.history[-1]["train_accuracy"] > 0.9  # accuracy against the soft labels' argmax


def test_weight_averaging_is_the_released_model_and_resumes():
    saved = []
    model = build_model("mlp", in_channels=1, num_classes=3, image_size=6)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, ema_decay=0.9)
    result = train(model, blobs(), train_cfg=cfg, device=CPU, persist=saved.append, progress=False)
    ema = saved[-1]["callbacks"]["ema"]
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, ema[name])
    again = train(build_model("mlp", in_channels=1, num_classes=3, image_size=6), blobs(), train_cfg=cfg,
                  device=CPU, resume=saved[-1], progress=False)  # fmt: skip
    assert len(again.history) == 2  # already complete: nothing retrained
    assert isinstance(nn.Module(), nn.Module)
