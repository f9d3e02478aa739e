"""``model.trainable`` as a REGEX never leaves a re-initialised (random) head frozen.

A checkpoint whose head has another class count loads with the head at its fresh initialisation. With
``model.trainable=head`` or ``lora`` that head trains; with a pattern such as ``conv2|norm2`` it stayed frozen at
random weights, the body trained under it, and the report said fine-tuned. Refused now, in one line naming the
head's parameters and a pattern that includes them."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import aisec_train
from aisec_train.errors import ConfigError
from aisec_train.models import ModelFactory, SmallCNN
from aisec_train.train.loop import train
from tests.conftest import run_cli

CNN = "aisec_train.models.SmallCNN"


def _factory(checkpoint, trainable: str, classes: int = 3) -> ModelFactory:
    spec = {"_target_": CNN, "checkpoint_path": str(checkpoint), "trainable": trainable}
    return ModelFactory(spec, (1, 8, 8), classes, private=True)


def test_a_pattern_that_leaves_the_fresh_head_frozen_is_refused(cnn_checkpoint):
    # cnn_checkpoint's head has 10 classes: on 3 classes fc2 starts fresh
    with pytest.raises(ConfigError) as err:
        _factory(cnn_checkpoint, "conv2|norm2")(seed=0)
    assert str(err.value) == (
        "model.trainable='conv2|norm2' is not allowed: it leaves the re-initialised (random) layer(s) fc2 frozen "
        "(fc2.weight, fc2.bias), so the model would train under a random head; allowed: a pattern that also "
        "matches them (model.trainable='conv2|norm2|fc2'), or head, lora or all"
    )


def test_a_pattern_that_matches_only_part_of_the_fresh_head_names_the_rest(cnn_checkpoint):
    with pytest.raises(ConfigError, match=r"layer\(s\) fc2 frozen \(fc2.bias\), so the model would train under"):
        _factory(cnn_checkpoint, r"conv2|fc2\.weight")(seed=0)


def test_the_suggested_pattern_trains_the_head_under_dp(cnn_checkpoint):
    factory = _factory(cnn_checkpoint, "conv2|norm2|fc2")
    model = factory(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = aisec_train.compose(["train.epochs=1", "train.batch_size=16", "privacy.noise_multiplier=1.0",
                                "privacy.target_epsilon=50", "privacy.accountant=rdp"])  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    result = train(model, data, train_cfg=cfg.train, privacy_cfg=cfg.privacy, device=torch.device("cpu"),
                   progress=False)  # fmt: skip
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert {"fc2.weight", "fc2.bias"} <= trained and "conv1.weight" not in trained
    after = result.model.state_dict()
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])  # the fresh head trained
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert factory.describe()["reinitialized_layers"] == ["fc2"]


def test_a_pattern_may_freeze_a_head_the_checkpoint_filled(tmp_path):
    # Same class count: the head is pretrained, not random, so freezing it is a choice (linear features, say).
    torch.manual_seed(1)
    path = tmp_path / "cnn3.pt"
    torch.save({"model": SmallCNN(in_channels=1, num_classes=3, image_size=8).state_dict()}, path)
    factory = _factory(path, "conv2|norm2")
    model = factory(seed=0)
    assert not model.fc2.weight.requires_grad and model.conv2.weight.requires_grad
    assert factory.describe()["reinitialized_layers"] == []


def test_head_and_lora_still_train_the_fresh_head(cnn_checkpoint):
    for trainable in ("head", "lora"):
        model = _factory(cnn_checkpoint, trainable)(seed=0)
        assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("fc2."))


def test_a_timm_head_resized_for_the_data_must_train(tmp_path):
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), tmp_path / "in10.pth")
    spec = {"_target_": "aisec_train.models.timm_model", "arch": "test_resnet",
            "checkpoint_path": str(tmp_path / "in10.pth"), "trainable": "layer4"}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        ModelFactory(spec, (3, 32, 32), 3, private=True)(seed=0)
    line = str(err.value)
    assert line.startswith("model.trainable='layer4' is not allowed: it leaves the re-initialised (random) layer(s) ")
    assert "fc frozen (fc.weight, fc.bias)" in line and "(model.trainable='layer4|fc')" in line
    spec["trainable"] = "layer4|fc"
    model = ModelFactory(spec, (3, 32, 32), 3, private=True)(seed=0)
    trained = {n.removeprefix("net.") for n, p in model.named_parameters() if p.requires_grad}
    assert {"fc.weight", "fc.bias"} <= trained and not any(n.startswith("layer1.") for n in trained)


@pytest.mark.slow  # the CLI loads the digits before it builds the model (about 6-10 s on 2 busy cores)
def test_the_cli_refuses_it_in_one_line_before_a_step(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "cnn5.pt"
    torch.save({"model": SmallCNN(in_channels=1, num_classes=5, image_size=8).state_dict()}, path)
    run_dir = tmp_path / "run"
    proc = run_cli(f"hydra.run.dir={run_dir}", "train.epochs=1", "audit=off", f"model.checkpoint_path={path}",
                   "model.trainable='conv2|norm2'")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("aisec-train: error: model.trainable='conv2|norm2' is not allowed: it leaves the ")
    assert "(model.trainable='conv2|norm2|fc2')" in proc.stderr
    assert not (run_dir / "report.json").exists() and not (run_dir / "checkpoints").exists()
    assert not (run_dir / "model.pt").exists()
