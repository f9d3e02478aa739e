"""Augmentation multiplicity (train.augmult=K) and the wide ResNet preset (model=wrn), the parts of De et al.'s
DP image recipe (experiment=dp_recipe): K views of a record make ONE clipped per-record gradient, checked against a
per-sample loop; the privacy accounting is that of K=1; the WRN trains under DP."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from aisec_train.models.presets import SmallCNN
from aisec_train.models.wrn import WideResNet, WSConv2d
from aisec_train.train.augmult import AugMult, install, views
from aisec_train.train.config import Accountant, GradSampleMode, PrivacyConfig, TrainConfig
from aisec_train.train.loop import train
from aisec_train.train.objectives import CrossEntropy
from tests.conftest import run_cli

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_views_are_k_shifted_copies_of_each_record_in_record_major_order():
    x = torch.rand(3, 2, 8, 8)
    out = views(x, 4, pad=1, generator=torch.Generator().manual_seed(0))
    assert out.shape == (12, 2, 8, 8)
    for row in range(12):  # a shift by at most one pixel: the 6x6 centre of the view is a window of the record
        record = x[row // 4]
        found = any(
            torch.equal(out[row, :, 1:7, 1:7], record[:, 1 + dy : 7 + dy, 1 + dx : 7 + dx])
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        assert found, row
    assert not all(torch.equal(out[0], out[i]) for i in range(1, 4))  # the views differ
    again = views(x, 4, pad=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def test_k_views_make_one_clipped_gradient_per_record_as_a_per_sample_loop_does():
    """Opacus hooks + augmult's regrouping vs. the definition: for each record, the gradient of the mean of its
    K views' losses, clipped to C, summed over records, divided by the expected batch size (noise 0)."""
    torch.manual_seed(0)
    k, clip, b = 3, 0.05, 5
    net = SmallCNN(1, 4, 8, width=16)
    reference = SmallCNN(1, 4, 8, width=16)
    reference.load_state_dict(net.state_dict())
    x, y = torch.rand(b, 1, 8, 8), torch.randint(0, 4, (b,))

    model = GradSampleModule(net)
    optimizer = DPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=b)  # fmt: skip
    install(optimizer, k)
    torch.manual_seed(7)
    loss, logits = AugMult(CrossEntropy(), k)(model, model, x, y, nn.CrossEntropyLoss())
    assert logits.shape == (b, 4)
    loss.backward()
    optimizer.pre_step()  # regroup, clip, (no) noise, scale: p.grad is what SGD would apply
    assert all(p.grad_sample.shape[0] == b for p in net.parameters())  # one per-sample row per record
    ours = _flat([p.grad for p in net.parameters()])

    torch.manual_seed(7)
    xs = views(x, k)  # the same draws
    total, norms = torch.zeros_like(ours), []
    params = list(reference.parameters())
    for i in range(b):
        record_loss = F.cross_entropy(reference(xs[i * k : (i + 1) * k]), y[i].repeat(k))  # mean over its views
        g = _flat(torch.autograd.grad(record_loss, params))
        norms.append(float(g.norm()))
        total += g * min(1.0, clip / (float(g.norm()) + 1e-6))
    assert max(norms) > clip  # clipping really acted, so per-view clipping would have given another answer
    torch.testing.assert_close(ours, total / b, atol=1e-6, rtol=1e-4)


def _blobs(n=96):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = (torch.rand(n, 1, 8, 8, generator=g) * 0.3 + y[:, None, None, None] * 0.3).clamp(0, 1)
    return TensorDataset(x, y)


def test_augmult_is_accounted_as_one_record_per_sampling_coin():
    # explicit noise and RDP: calibrating PRV to a target costs ~1 min of CPU here, and is not what is tested
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, delta=1e-3, accountant=Accountant.rdp,
                            grad_sample_mode=GradSampleMode.hooks)  # fmt: skip
    runs = {}
    for k in (1, 3):
        cfg = TrainConfig(epochs=2, batch_size=32, max_physical_batch_size=16, lr=0.5, ema_decay=0.0, augmult=k)
        model = SmallCNN(1, 3, 8, width=16)
        runs[k] = train(model, _blobs(), train_cfg=cfg, privacy_cfg=privacy, device=CPU, progress=False)
    one, three = runs[1].ledger.summary(), runs[3].ledger.summary()
    for key in ("epsilon", "noise_multiplier", "sample_rate", "steps"):
        assert three[key] == one[key], key
    assert runs[3].history[-1]["train_accuracy"] > 0.5  # it trains


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.augmult=0", "train.augmult=0 is not allowed: must be an integer >= 1"),
        ("train.augmult=2", "train.augmult=2 is not allowed with privacy.grad_sample_mode=bk"),
        (
            "train.augmult=4 privacy.grad_sample_mode=ghost",
            "train.augmult=4 is not allowed with privacy.grad_sample_mode=ghost",
        ),
        # the flip mirrors augmult's views: with K=1 (dp_recipe's CPU default) it silently never ran
        ("train.augmult_flip=true", "train.augmult_flip=True is not allowed with train.augmult=1"),
    ],
)
def test_augmult_refusals_are_one_line(tmp_path, override, message):
    proc = run_cli(*override.split(), f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, naming what is allowed
    assert "allowed" in proc.stderr and not (tmp_path / "r" / "model.pt").exists()


def test_weight_standardised_conv_standardises_each_output_kernel():
    conv = WSConv2d(2, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(5).add_(3)  # any scale and offset of the raw kernel ...
    x = torch.rand(2, 2, 6, 6)
    w = conv.weight
    std = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
    torch.testing.assert_close(conv(x), F.conv2d(x, std, padding=1))  # ... is used standardised


def test_wrn_builds_at_every_depth_and_refuses_a_bad_one():
    for depth, image in ((10, 8), (16, 32)):
        model = WideResNet(3, 10, image, depth=depth, width=1)
        assert model(torch.zeros(2, 3, image, image)).shape == (2, 10)
        assert not any(isinstance(m, (nn.BatchNorm2d, nn.Conv2d)) for m in model.modules())
    with pytest.raises(ValueError, match="model.depth=12 is not allowed"):
        WideResNet(3, 10, 32, depth=12)


def test_wrn_trains_under_dp_with_augmult():
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, delta=1e-3, accountant=Accountant.rdp,
                            grad_sample_mode=GradSampleMode.hooks, max_grad_norm=1.0)  # fmt: skip
    cfg = TrainConfig(epochs=2, batch_size=24, max_physical_batch_size=24, lr=1.0, momentum=0.0, ema_decay=0.0,
                      augmult=2)  # fmt: skip
    model = WideResNet(1, 3, 8, depth=10, width=1, groups=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, _blobs(48), train_cfg=cfg, privacy_cfg=privacy, device=CPU, progress=False)
    assert result.grad_sample_mode == "hooks" and result.ledger.steps == 4
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values())


def test_wrn_per_sample_gradients_through_the_standardisation_equal_a_per_sample_loop():
    torch.manual_seed(0)
    model = WideResNet(1, 5, 8, depth=10, width=1, groups=4)
    reference = WideResNet(1, 5, 8, depth=10, width=1, groups=4)
    reference.load_state_dict(model.state_dict())
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 5, (4,))
    F.cross_entropy(GradSampleModule(model)(x), y).backward()
    for i in range(4):
        loss = F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        for (name, p), g in zip(model.named_parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad_sample[i], g, atol=1e-6, rtol=1e-4, msg=name)


def test_dp_recipe_preset_combines_the_pieces_and_passes_its_own_refusals():
    from aisec_train.api import compose
    from aisec_train.train.augmult import check

    cfg = compose(["experiment=dp_recipe"])
    assert cfg.model["_target_"] == "aisec_train.models.wrn.WideResNet"
    # K=1 at CPU size (chosen on validation; configs/experiment/dp_recipe.yaml): augmult is the full-size override
    assert cfg.train.augmult >= 1 and cfg.train.ema_decay > 0 and cfg.train.momentum == 0
    assert cfg.train.batch_size > cfg.train.max_physical_batch_size  # a large logical batch, split physically
    assert cfg.privacy.grad_sample_mode is GradSampleMode.hooks and cfg.privacy.target_epsilon == 8.0
    check(cfg)  # the preset is not refused by the augmult rules it relies on


def test_max_physical_batch_size_counts_records_and_a_records_views_travel_together():
    """Under augmult, ``train.max_physical_batch_size`` is counted in RECORDS (train/augmult.py): Opacus'
    BatchMemoryManager splits the logical batch into at most m records, and only then are they expanded to K views,
    so a forward holds at most m * K rows, always whole records. Counted in rows it would hold at most m."""
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, delta=1e-3, accountant=Accountant.rdp,
                            grad_sample_mode=GradSampleMode.hooks)  # fmt: skip
    k, m = 3, 8
    cfg = TrainConfig(epochs=1, batch_size=48, max_physical_batch_size=m, lr=0.5, ema_decay=0.0, augmult=k)
    model = SmallCNN(1, 3, 8, width=16)
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _module, args: rows.append(len(args[0])))
    train(model, _blobs(), train_cfg=cfg, privacy_cfg=privacy, device=CPU, progress=False)
    assert rows and all(r % k == 0 for r in rows), rows  # whole records: K views each
    assert max(rows) <= m * k, rows  # at most m records per physical batch
    # two Poisson batches of ~48 records split at m = 8: a physical batch of more than m rows is (near-)certain
    assert max(rows) > m, rows


def _documented_full_size() -> list[str]:
    """The GPU-size overrides the preset's header documents (``#   aisec-train experiment=dp_recipe ...``)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "configs/experiment/dp_recipe.yaml").read_text()
    start = text.index("#   aisec-train experiment=dp_recipe")
    lines = []
    for line in text[start:].splitlines():
        if not line.startswith("#   "):
            break
        lines.append(line[1:].strip().rstrip("\\"))
    return " ".join(lines).split()[1:]  # drop the program name


def test_dp_recipe_documented_full_size_command_composes_and_passes_the_augmult_rules():
    from aisec_train.api import compose
    from aisec_train.train.augmult import check

    overrides = _documented_full_size()
    assert overrides[0] == "experiment=dp_recipe" and len(overrides) > 5, overrides
    cfg = compose(overrides)  # composing reads no dataset files
    assert cfg.train.augmult >= 8 and cfg.model["width"] >= 4 and cfg.model["depth"] >= 16
    assert cfg.train.batch_size >= 1024 and cfg.train.ema_decay >= 0.99
    check(cfg)
