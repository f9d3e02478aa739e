"""The repair's fine-tuning pieces (backdoor/retune.py) and the boosted malicious client (model replacement)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from aisec_train.backdoor import federated_poison, prune, retune
from aisec_train.backdoor.config import BackdoorConfig, FinetuneHead
from aisec_train.cli import CONFIG_DIR
from aisec_train.components import build
from aisec_train.config import register_configs, to_config
from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.models import ModelFactory
from aisec_train.train.loop import accuracy
from aisec_train.train.objectives import BlendedInputs, CrossEntropy, Distillation, ErasedInputs, FeatureShift
from tests.conftest import run_cli


def _model():
    return ModelFactory({"_target_": "aisec_train.models.SmallCNN"}, (1, 8, 8), 10)(seed=0)


def test_the_head_is_every_module_after_the_feature_layer_and_only_it_is_reinitialised():
    model, probe = _model(), torch.rand(4, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    head = retune.reinit_head(model, "features_out", probe, seed=3)
    assert head == ["squeeze", "fc1", "fc2"]
    assert torch.equal(state, torch.random.get_rng_state())  # seeded on a forked generator
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    again = _model()
    retune.reinit_head(again, "features_out", probe, seed=3)
    assert torch.equal(again.fc2.weight, model.fc2.weight)  # deterministic in the seed


def test_the_classifier_is_the_last_linear_after_the_feature_layer_and_can_be_reinitialised_alone():
    model, probe = _model(), torch.rand(4, 1, 8, 8)
    head = retune.head_modules(model, "features_out", probe)
    assert retune.classifier(model, head) == "fc2" and retune.classifier(model, ["squeeze"]) is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert retune.reinit_head(model, "features_out", probe, seed=3, only=["fc2"]) == ["fc2"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc2.weight", "fc2.bias"}


def test_feature_shift_adds_alpha_times_the_inner_product_with_the_old_classifier_at_its_norm():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    original = torch.randn(3, 5) * 4.0
    shift = FeatureShift(CrossEntropy(), model.weight, original, alpha=0.2)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    loss, logits = shift(model, model, x, y, torch.nn.CrossEntropyLoss())
    assert float(model.weight.detach().norm()) == pytest.approx(float(original.norm()), rel=1e-5)  # projected first
    expected = torch.nn.functional.cross_entropy(model(x), y) + 0.2 * (model.weight * original).sum()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    plain = torch.nn.Linear(5, 3)
    plain.load_state_dict(model.state_dict())
    torch.nn.functional.cross_entropy(plain(x), y).backward()
    assert torch.allclose(model.weight.grad - plain.weight.grad, 0.2 * original, atol=1e-5)  # the penalty's pull


def _trusted(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_shift_fine_tuning_reinitialises_only_the_classifier_and_steers_it_off_the_old_one(weight):
    model, trusted = _model(), _trusted()
    old = model.fc2.weight.detach().clone()
    fc1 = model.fc1.weight.detach().clone()
    cfg = BackdoorConfig(finetune_epochs=3, shift_weight=weight)
    mode, head = prune.fine_tune(model, "features_out", trusted, torch.device("cpu"), cfg, seed=0)
    assert (mode, head) == ("shift", ["fc2"])
    assert float(model.fc2.weight.norm()) == pytest.approx(float(old.norm()), rel=1e-4)  # held at the old norm
    cosine = float(torch.nn.functional.cosine_similarity(model.fc2.weight.flatten(), old.flatten(), dim=0))
    if weight:
        assert cosine < -0.5  # pushed away from the compromised classifier
    else:
        assert abs(cosine) < 0.5  # a fresh classifier alone has no reason to point anywhere in particular
    # fc1 was not re-initialised: it moved only by training at the body's lr, so it stays near where it was
    assert float((model.fc1.weight - fc1).norm()) < 0.5 * float(fc1.norm())


def test_shift_on_a_model_without_a_linear_classifier_reinitialises_the_whole_head_and_says_so():
    class ConvHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.features_out = torch.nn.Tanh()
            self.classify = torch.nn.Conv2d(4, 10, 8)

        def forward(self, x):
            return self.classify(self.features_out(self.conv(x))).flatten(1)

    torch.manual_seed(0)
    model = ConvHead()
    mode, head = prune.fine_tune(model, "features_out", _trusted(), torch.device("cpu"),
                                 BackdoorConfig(finetune_epochs=1), seed=0)  # fmt: skip
    assert (mode, head) == ("reinit", ["classify"])
    kept = prune.fine_tune(model, "features_out", _trusted(), torch.device("cpu"),
                           BackdoorConfig(finetune_epochs=1, finetune_head=FinetuneHead.keep), seed=0)  # fmt: skip
    assert kept == ("keep", ["classify"])
    assert prune.fine_tune(model, "features_out", _trusted(), torch.device("cpu"),
                           BackdoorConfig(finetune_epochs=0), seed=0) == ("off", [])  # fmt: skip


def test_scaled_sgd_gives_the_body_its_fraction_of_the_lr_and_the_tags_go_away():
    model, probe = _model(), torch.rand(2, 1, 8, 8)
    head = retune.head_modules(model, "features_out", probe)
    with retune.lr_scales(model, head, body=0.2):
        opt = build({"_target_": retune.OPTIMIZER, "lr": 0.1, "weight_decay": 0.02}, "optimizer",
                    params=model.parameters())  # fmt: skip
    lrs = sorted((g["lr"], len(g["params"])) for g in opt.param_groups)
    assert lrs == [(pytest.approx(0.02), 8), (pytest.approx(0.1), 4)]  # conv1, norm1, conv2, norm2 vs fc1, fc2
    assert not any(hasattr(p, retune.LR_SCALE) for p in model.parameters())
    sched = retune.WarmupCosine(opt, total_steps=100, pct_start=0.1)
    seen = []
    for _ in range(100):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    seen = np.array(seen)
    assert np.allclose(seen[:, 0] / seen[:, 1], 0.2)  # the ratio survives the schedule (OneCycleLR would not)
    assert seen[0, 1] == pytest.approx(0.01) and seen[9, 1] == pytest.approx(0.1) and seen[-1, 1] < 1e-3


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=["experiment=backdoor", *overrides]))


def test_a_boosted_malicious_client_scales_its_update_and_honest_ones_do_not():
    cfg = _cfg("federated=fedavg", "privacy=none", "backdoor.malicious_clients=1", "backdoor.boost=auto",
               "federated.clients=5")  # fmt: skip
    assert federated_poison.boost_factor(cfg) == 5.0  # n / eta with plain FedAvg's eta = 1
    delta = np.ones(3)
    assert np.array_equal(federated_poison.boost(delta, 0, cfg), 5 * delta)
    assert federated_poison.boost(delta, 1, cfg) is delta
    fixed = _cfg("federated=fedavg", "privacy=none", "backdoor.malicious_clients=2", "backdoor.boost=12.5")
    assert federated_poison.boost_factor(fixed) == 12.5 and federated_poison.boost(delta, 1, fixed)[0] == 12.5
    default = _cfg("federated=fedavg", "privacy=none", "backdoor.malicious_clients=1")
    assert federated_poison.boost(delta, 0, default) is delta  # default 1: the unboosted client
    with pytest.raises(Exception, match="backdoor.boost"):
        BackdoorConfig(boost="big")


def test_a_bad_boost_is_refused_in_one_line(tmp_path):
    proc = run_cli("experiment=backdoor", "backdoor.boost=0.5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "backdoor.boost=" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "report.json").exists()


class _Recorder(torch.nn.Module):
    """A real module that keeps what it was called on (the student or the teacher of the objective below)."""

    def __init__(self):
        super().__init__()
        self.linear, self.seen = torch.nn.Linear(3 * 4 * 4, 10), []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.linear(x.flatten(1))


def test_blended_inputs_blend_about_half_the_rows_with_fresh_keys_and_the_teacher_reads_them_clean():
    student, teacher = _Recorder(), _Recorder()
    x, y = torch.rand(400, 3, 4, 4), torch.randint(0, 10, (400,))
    inner = Distillation(teacher, temperature=2.0, weight=0.5)
    blended = BlendedInputs(inner, max_weight=0.3, seed=0)
    assert (blended.name, blended.forwards) == (inner.name, inner.forwards)
    loss, logits = blended(student, student, x, y, torch.nn.CrossEntropyLoss())
    assert torch.isfinite(loss) and logits.shape == (400, 10)
    assert len(teacher.seen) == 1 and torch.equal(teacher.seen[0], x)  # the teacher never sees a blended row
    seen = student.seen[0]
    changed = (seen != x).flatten(1).any(1)
    assert 150 < int(changed.sum()) < 250  # probability 1/2 per row
    assert float(seen.min()) >= 0.0 and float(seen.max()) <= 1.0  # a convex combination of two [0, 1] images
    assert float((seen - x).abs().max()) <= 0.3 + 1e-6  # a <= max_weight, |k - x| <= 1
    blended(student, student, x, y, torch.nn.CrossEntropyLoss())
    again = student.seen[1]
    both = changed & (again != x).flatten(1).any(1)
    assert not torch.allclose(again[both], seen[both])  # fresh keys and weights at every step
    replay = BlendedInputs(inner, max_weight=0.3, seed=0)
    replay(student, student, x, y, torch.nn.CrossEntropyLoss())
    assert torch.equal(student.seen[2], seen)  # seeded: the repair is reproducible


def test_a_repair_with_blended_inputs_answers_on_blended_images_what_the_clean_ones_are():
    """The point of ``backdoor.repair_blend``: on digits, a key blended over the test images at 0.6 (one the repair
    never drew) costs the model fine-tuned with it far less accuracy than the one fine-tuned without (measured:
    0.78 against 0.49 at a key weight of 0.6; both 0.92-0.93 on the clean images)."""
    data = load_dataset(DatasetConfig(), seed=0)
    test = torch.stack([data.test[i][0] for i in range(len(data.test))])
    labels = torch.as_tensor([int(data.test[i][1]) for i in range(len(data.test))])
    key = torch.rand(test.shape[1:], generator=torch.Generator().manual_seed(123))
    blended = torch.utils.data.TensorDataset(0.4 * test + 0.6 * key, labels)
    scores = {}
    for weight in (0.0, 0.4):
        model = _model()
        cfg = BackdoorConfig(finetune_epochs=8, repair_blend=weight)
        prune.fine_tune(model, "features_out", data.train, torch.device("cpu"), cfg, seed=0)
        scores[weight] = accuracy(model, blended, torch.device("cpu"))
    assert scores[0.4] > scores[0.0] + 0.15, scores


def test_erased_inputs_put_one_noise_box_in_each_chosen_row_and_the_teacher_reads_them_clean():
    student, teacher = _Recorder(), _Recorder()
    x, y = torch.rand(400, 3, 4, 4), torch.randint(0, 10, (400,))
    inner = Distillation(teacher, temperature=2.0, weight=0.5)
    erased = ErasedInputs(inner, p=1.0, seed=0)
    assert (erased.name, erased.forwards) == (inner.name, inner.forwards)
    loss, logits = erased(student, student, x, y, torch.nn.CrossEntropyLoss())
    assert torch.isfinite(loss) and logits.shape == (400, 10)
    assert len(teacher.seen) == 1 and torch.equal(teacher.seen[0], x)  # the teacher never sees an erased row
    seen = student.seen[0]
    box = seen != x  # (N, C, H, W)
    assert bool(box.flatten(1).any(1).all())  # p = 1: every row
    assert torch.equal(box.any(1), box.all(1))  # the same pixels in every channel
    pixels = box[:, 0]
    rows, cols = pixels.any(2), pixels.any(1)  # (N, H), (N, W): the box is their product, one rectangle
    assert torch.equal(pixels, rows[:, :, None] & cols[:, None, :])
    assert int(pixels.flatten(1).sum(1).max()) <= 4  # at most 10% of 16 pixels, rounded: one row or column of 4
    assert float(seen.min()) < 0.0 or float(seen.max()) > 1.0  # N(0, 1) noise, not a pixel value
    ErasedInputs(inner, p=1.0, seed=0)(student, student, x, y, torch.nn.CrossEntropyLoss())
    assert torch.equal(student.seen[1], seen)  # seeded: the repair is reproducible
    half = ErasedInputs(CrossEntropy(), p=0.5, seed=1).erase(x)
    assert 150 < int((half != x).flatten(1).any(1).sum()) < 250
    tokens = torch.randint(0, 5, (4, 7))
    assert torch.equal(erased.erase(tokens), tokens)  # not an image: passed through


def test_a_repair_with_erased_boxes_answers_on_patched_images_what_the_clean_ones_are():
    """The point of ``backdoor.repair_erase``: on digits, a white 3x3 box in a corner (a BadNets-like patch the
    repair never drew) and a box of fresh noise cost the model fine-tuned with erased boxes far less accuracy than
    the one fine-tuned without (measured: 0.59 against 0.37 patched, 0.56 against 0.40 with noise)."""
    data = load_dataset(DatasetConfig(), seed=0)
    test = torch.stack([data.test[i][0] for i in range(len(data.test))])
    labels = torch.as_tensor([int(data.test[i][1]) for i in range(len(data.test))])
    patched = test.clone()
    patched[:, :, 0:3, 5:8] = 1.0
    noisy = test.clone()
    noisy[:, :, 2:5, 2:5] = torch.randn(noisy[:, :, 2:5, 2:5].shape, generator=torch.Generator().manual_seed(123))
    scores = {}
    for erase in (0.0, 1.0):
        model = _model()
        cfg = BackdoorConfig(finetune_epochs=8, repair_erase=erase)
        prune.fine_tune(model, "features_out", data.train, torch.device("cpu"), cfg, seed=0)
        scores[erase] = [accuracy(model, torch.utils.data.TensorDataset(x, labels), torch.device("cpu"))
                         for x in (patched, noisy)]  # fmt: skip
    assert scores[1.0][0] > scores[0.0][0] + 0.1 and scores[1.0][1] > scores[0.0][1] + 0.1, scores


def test_a_bad_repair_erase_is_refused_in_one_line(tmp_path):
    proc = run_cli("experiment=backdoor", "backdoor.repair_erase=1.5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "backdoor.repair_erase=1.5 is not allowed: must be in [0, 1]" in proc.stderr
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_bad_repair_blend_is_refused_in_one_line(tmp_path):
    proc = run_cli("experiment=backdoor", "backdoor.repair_blend=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "backdoor.repair_blend=1.0 is not allowed: must be in [0, 1)" in proc.stderr
    assert not (tmp_path / "run" / "report.json").exists()
