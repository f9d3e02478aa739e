"""Mixed precision (train.precision): autocast of the forward only, so per-sample norms, clipping and noise stay
float32 under every grad-sample mode and adversarial training; fp16 under DP is refused (its loss scaler would
scale per-sample gradients before clipping)."""

from __future__ import annotations

import platform

import pytest
import torch

from aisec_train import compose
from aisec_train.errors import ConfigError
from aisec_train.models import build_model
from aisec_train.train.callbacks import Callback
from aisec_train.train.config import GradSampleMode, PrivacyConfig, TrainConfig
from aisec_train.train.loop import train
from aisec_train.train.objectives import objective_from_config
from aisec_train.train.precision import check_precision
from tests.conftest import read_report, run_cli
from tests.test_loop import blobs

CPU = torch.device("cpu")


class Seen(Callback):
    """What the step really computed: the forward's dtype, the per-sample norms' dtype, the parameters' dtype."""

    def __init__(self):
        self.logits, self.norms, self.params = set(), set(), set()

    def after_step(self, loop) -> None:
        norms = getattr(loop.model, "_per_sample_gradient_norms", None)  # Opacus ghost
        norms = getattr(loop.model, "per_sample_gradient_norms", None) if norms is None else norms  # bk
        if isinstance(norms, torch.Tensor):
            self.norms.add(norms.dtype)
        self.params |= {p.dtype for p in loop.plain.parameters()}


class LogitDtype(torch.nn.Module):
    def __init__(self, inner, seen):
        super().__init__()
        self.inner, self.seen = inner, seen

    def forward(self, x):
        out = self.inner(x)
        self.seen.logits.add(out.dtype)
        return out


@pytest.mark.parametrize(
    "mode,robust", [("bk", "none"), ("hooks", "none"), ("bk", "pgd_at"), ("hooks", "trades")]
)  # ghost under bf16 is refused: its second backward clips bf16 gradients (tests/test_dp_numerics.py)
def test_bf16_forward_with_fp32_clipping_in_every_mode(mode, robust):
    seen = Seen()
    model = LogitDtype(build_model("cnn", in_channels=1, num_classes=3, image_size=6), seen)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.2, ema_decay=0.0, precision="bf16")
    privacy = PrivacyConfig(target_epsilon=5.0, delta=1e-3, grad_sample_mode=GradSampleMode(mode))
    objective = objective_from_config(compose([f"robustness={robust}", "dataset=synthetic"]).robustness)
    result = train(model, blobs(), train_cfg=cfg, privacy_cfg=privacy, device=CPU, callbacks=[seen],
                   objective=objective, progress=False)  # fmt: skip
    assert torch.bfloat16 in seen.logits  # the forward ran in bf16 ...
    assert seen.params == {torch.float32}  # ... the weights stayed fp32 ...
    assert seen.norms <= {torch.float32}  # ... and so did the per-sample norms clipping used (bk, ghost)
    assert result.ledger.steps > 0 and all(torch.isfinite(p).all() for p in result.model.parameters())


def test_fp16_without_dp_uses_a_grad_scaler():
    model = build_model("mlp", in_channels=1, num_classes=3, image_size=6)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.2, ema_decay=0.0, precision="fp16")
    result = train(model, blobs(), train_cfg=cfg, device=CPU, progress=False)
    assert result.history[-1]["train_accuracy"] > 0.5  # learned: the scaler did not skip every step


def test_fp16_under_dp_and_unknown_precisions_are_refused():
    with pytest.raises(ConfigError, match=r"train.precision='fp16' is not allowed with privacy=dpsgd"):
        check_precision("fp16", CPU, private=True)
    check_precision("fp16", CPU, private=False)  # torch autocasts fp16 on this CPU
    with pytest.raises(ConfigError, match=r"train.precision='fp8' is not allowed: must be 32, bf16 or fp16"):
        compose(["train.precision=fp8"])
    assert compose(["train.precision=32"]).train.precision == "32"


def test_bf16_dp_job_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=smoke", "audit=off", "robustness.evaluate=false", "train.precision=bf16",
                   f"hydra.run.dir={run_dir}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(run_dir)
    assert report["train"]["precision"] == "bf16"
    if platform.libc_ver()[0] == "glibc":  # train.keep_freed_memory (default true) took effect: the report says so
        assert report["train"]["keep_freed_memory"] is True
    assert report["privacy"]["mode"] == "dpsgd" and report["privacy"]["epsilon"] <= 3.0 + 1e-9
    assert report["metrics"]["clean_accuracy"] > 0.1


def test_fp16_dp_job_refused_in_one_line(tmp_path):
    proc = run_cli("experiment=smoke", "train.precision=fp16", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "aisec-train: error: train.precision='fp16' is not allowed with privacy=dpsgd: its loss scaler multiplies "
        "each per-sample gradient before clipping; allowed: bf16 (no scaler needed) or 32"
    ]
