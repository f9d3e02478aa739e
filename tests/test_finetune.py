"""DP fine-tuning (issue 23): checkpoints with a resized head, frozen parameters, BatchNorm made DP-safe, LoRA."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import aisec_train
from aisec_train.errors import ConfigError
from aisec_train.models import ModelFactory, SmallCNN, check_model_config
from aisec_train.models.finetune import FrozenBatchNorm, check_adapters_moved, read_state_dict
from aisec_train.train.loop import train
from tests.conftest import read_report, run_cli
from tests.test_open_model import SMALL, assert_refused, write_image_folder

CNN = "aisec_train.models.SmallCNN"
MODES = ["hooks", "ghost", "bk"]


def _dp_train(model, mode: str, epochs: int = 1, seed: int = 0):
    cfg = aisec_train.compose([f"train.epochs={epochs}", "train.batch_size=16", f"privacy.grad_sample_mode={mode}",
                               "privacy.target_epsilon=8", f"train.seed={seed}"])  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    return train(model, data, train_cfg=cfg.train, privacy_cfg=cfg.privacy, device=torch.device("cpu"), progress=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trainable", ["head", "conv2|norm2|fc2"])  # a pattern must name the fresh head too
def test_frozen_parameters_are_untouched_bit_for_bit_after_dp_training(cnn_checkpoint, mode, trainable):
    factory = ModelFactory({"_target_": CNN, "checkpoint_path": str(cnn_checkpoint), "trainable": trainable},
                           (1, 8, 8), 3, private=True)  # fmt: skip
    model = factory(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _dp_train(model, mode)
    assert result.ledger.steps > 0 and result.grad_sample_mode == mode
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    body = {"conv2.weight", "conv2.bias", "norm2.weight", "norm2.bias"}
    expected = {"fc2.weight", "fc2.bias"} | (set() if trainable == "head" else body)
    assert trained == expected
    after = result.model.state_dict()
    for name, value in after.items():
        if name in trained:
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), f"frozen {name} moved"
    # the body came from the checkpoint (its 10-class head did not fit 3 classes and was re-initialised)
    saved = torch.load(cnn_checkpoint, weights_only=True)["model"]
    assert torch.equal(before["conv1.weight"], saved["conv1.weight"])
    assert factory.describe()["reinitialized_layers"] == ["fc2"]


def test_the_accountant_does_not_change_with_what_is_frozen(cnn_checkpoint):
    def ledger(trainable):
        spec = {"_target_": CNN, "checkpoint_path": str(cnn_checkpoint), "trainable": trainable}
        return _dp_train(ModelFactory(spec, (1, 8, 8), 3, private=True)(seed=0), "hooks").ledger.summary()

    full, head = ledger("all"), ledger("head")
    for key in ("epsilon", "noise_multiplier", "sample_rate", "steps"):
        assert full[key] == head[key], key


@pytest.mark.parametrize("mode", MODES)
def test_lora_adapters_train_under_every_grad_sample_mode(cnn_checkpoint, mode):
    spec = {"_target_": CNN, "checkpoint_path": str(cnn_checkpoint), "trainable": "lora", "lora": {"r": 2}}
    factory = ModelFactory(spec, (1, 8, 8), 3, private=True)
    model = factory(seed=0)
    with pytest.raises(ConfigError, match="trained nothing: all 3 LoRA B matrices are still at their initial zeros"):
        check_adapters_moved(model)  # fresh adapters: the release guard refuses them
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and not k.startswith("fc2.")}
    result = _dp_train(model, mode)
    assert check_adapters_moved(result.model) == {"adapters": 3, "moved": 3}
    after = result.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the pretrained base stays frozen
    tuned = factory.describe()
    assert tuned["trainable"] == "lora" and 0 < tuned["trainable_parameters"] < tuned["total_parameters"]


def test_batchnorm_is_frozen_in_eval_mode_when_weights_are_loaded(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=1000).state_dict(), path)
    spec = {"_target_": "aisec_train.models.timm_model", "arch": "resnet18", "checkpoint_path": str(path)}
    frozen = ModelFactory(spec, (3, 16, 16), 3, private=True)
    model = frozen(seed=0)
    assert isinstance(model.bn1, FrozenBatchNorm) and not any(p.requires_grad for p in model.bn1.parameters())
    model.train()  # training mode must not turn the batch into a statistic
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)
    assert frozen.describe()["batchnorm"].startswith("frozen in eval mode")
    converted = ModelFactory({**spec, "batchnorm": "groupnorm"}, (3, 16, 16), 3, private=True)
    assert converted.describe()["batchnorm"].startswith("converted to GroupNorm")
    scratch = ModelFactory({k: v for k, v in spec.items() if k != "checkpoint_path"}, (3, 16, 16), 3, private=True)
    assert scratch.describe()["batchnorm"].startswith("converted to GroupNorm")


def test_an_aisec_train_model_pt_is_verified_by_its_keyed_tag(tmp_path):
    from aisec_train.train import checkpoint

    state = SmallCNN(in_channels=1, num_classes=10, image_size=8).state_dict()
    wrapped = {**{f"net.{k}": v for k, v in state.items()}, "mean": torch.zeros(1), "std": torch.ones(1)}
    checkpoint.save(wrapped, tmp_path / "model.pt", root=tmp_path)
    loaded = read_state_dict(str(tmp_path / "model.pt"))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    raw = bytearray((tmp_path / "model.pt").read_bytes())
    raw[-20] ^= 1
    (tmp_path / "model.pt").write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="model.checkpoint_path=.*model.pt.* is not allowed"):
        read_state_dict(str(tmp_path / "model.pt"))


def test_a_pinned_checkpoint_is_refused_when_it_changes_and_an_unpinned_untagged_one_is_reported_unverified(tmp_path):
    """Deleting an aisec-train model.pt's tag makes it a third-party file: loaded as weights only, but the report
    says it was not verified; model.checkpoint_sha256 pins the bytes, and a changed file is refused."""
    import hashlib

    from aisec_train.models.finetune import FineTune, provenance

    state = SmallCNN(in_channels=1, num_classes=10, image_size=8).state_dict()
    path = tmp_path / "base.pt"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance(str(path), None).startswith("not verified")
    assert provenance(str(path), digest) == "SHA-256 pinned by model.checkpoint_sha256"
    loaded = read_state_dict(str(path), digest)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({k: v + 1 for k, v in state.items()}, path)  # the attacker's weights, same name, tag-less
    with pytest.raises(ConfigError, match="model.checkpoint_sha256 pins .*; refusing changed weights"):
        read_state_dict(str(path), digest)
    spec = FineTune.parse({"checkpoint_path": str(path), "checkpoint_sha256": digest.upper()})
    assert spec.checkpoint_sha256 == digest
    with pytest.raises(ConfigError, match="model.checkpoint_sha256='abc' is not allowed: 64 hex digits"):
        FineTune.parse({"checkpoint_path": str(path), "checkpoint_sha256": "abc"})
    with pytest.raises(ConfigError, match="without model.checkpoint_path"):
        FineTune.parse({"checkpoint_sha256": digest})


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"checkpoint_path": "/no/such.pt"}, "model.checkpoint_path='/no/such.pt' is not allowed: no such file"),
        ({"trainable": "fc2(["}, "model.trainable='fc2([' is not allowed: all, head, lora or a regular expression"),
        ({"batchnorm": "maybe"}, "model.batchnorm='maybe' is not allowed: one of auto, freeze, groupnorm"),
        ({"trainable": "lora", "lora": {"r": 0}}, "model.lora.r=0 is not allowed: a positive integer"),
        ({"lora": {"rank": 4}}, "model.lora.rank is not allowed"),
        (
            {"pretrained": True},
            "model.pretrained=True is not allowed with model._target_='aisec_train.models.SmallCNN'",
        ),
    ],
)
def test_bad_fine_tuning_keys_are_refused_before_any_work(extra, needle):
    with pytest.raises(ConfigError) as err:
        check_model_config({"_target_": CNN, **extra})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_of_another_architecture_and_a_no_match_regex_are_refused(tmp_path, cnn_checkpoint):
    from aisec_train.models import MLP

    torch.save(MLP(in_channels=1, num_classes=10, image_size=8).state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(
        ConfigError,
        match="does not fit this model: fc1.weight is \\(128, 64\\) in the file, \\(64, 256\\) in the model",
    ):
        ModelFactory({"_target_": CNN, "checkpoint_path": str(tmp_path / "mlp.pt")}, (1, 8, 8), 3)()
    with pytest.raises(ConfigError, match="model.trainable='nothing_here' matches no parameter"):
        ModelFactory({"_target_": CNN, "trainable": "nothing_here"}, (1, 8, 8), 3)()


def test_pretrained_without_a_network_fails_in_one_line(monkeypatch):
    pytest.importorskip("timm")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what a machine without network sees
    factory = ModelFactory({"_target_": "aisec_train.models.timm_model", "arch": "resnet18", "pretrained": True},
                           (3, 16, 16), 5)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        factory()
    assert "model.pretrained=True is not allowed here: timm could not fetch 'resnet18' weights" in str(err.value)
    assert "model.checkpoint_path=FILE" in str(err.value) and "\n" not in str(err.value)


def test_a_1000_class_checkpoint_fine_tunes_on_a_3_class_folder_through_the_cli(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    pretrained = timm.create_model("test_resnet", num_classes=1000).state_dict()  # timm's tiny test ResNet
    torch.save({"state_dict": pretrained, "epoch": 90}, tmp_path / "in1k.pth")  # a timm training checkpoint
    write_image_folder(tmp_path / "imgs", per_class=16)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "model=timm", "model.arch=test_resnet", f"model.checkpoint_path={tmp_path / 'in1k.pth'}",
        "model.trainable=head",
        "dataset=imagefolder", f"dataset.root={tmp_path / 'imgs'}", "privacy.target_epsilon=8", "train.batch_size=16",
        *SMALL, "robustness.eval_samples=8", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(run_dir)
    model = report["model"]
    assert model["reinitialized_layers"] == ["fc"] and model["trainable"] == "head"
    n_bn = sum(k.endswith("running_mean") for k in pretrained)
    assert model["trainable_parameters"] == 96 * 3 + 3 and model["total_parameters"] > 300_000
    assert model["batchnorm"].startswith(f"frozen in eval mode ({n_bn} layers")
    assert report["privacy"]["epsilon"] <= 8.0 and report["privacy"]["steps"] > 0
    released = torch.load(run_dir / "model.pt", weights_only=True)
    body = [k for k in pretrained if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert all(torch.equal(released[k], pretrained[k]) for k in body)  # every frozen tensor, bit for bit
    assert released["fc.weight"].shape == (3, 96)


def test_a_bad_trainable_is_refused_by_the_cli_in_one_line(tmp_path):
    proc = run_cli("model.trainable='fc2(['", f"hydra.run.dir={tmp_path / 'r'}")
    assert_refused(proc, "model.trainable='fc2([' is not allowed", run_dir=tmp_path / "r")


def test_the_python_api_takes_a_peft_model_and_guards_its_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10, image_size=8)
    for p in net.parameters():
        p.requires_grad_(False)  # a "pretrained" base; LoRA on the convolutions and the first dense layer
    peft_model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "fc1"]))
    cfg = ["train.epochs=1", "audit=off", "robustness.evaluate=false", "privacy.target_epsilon=8"]
    report = aisec_train.run(cfg, model=peft_model, run_dir=tmp_path / "run")
    model = report.get("model")
    assert model["lora_adapters"] == {"adapters": 3, "moved": 3} and model["trainable"] == "as given"
    assert model["trainable_parameters"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert report.get("privacy.epsilon") <= 8.0


@pytest.mark.slow
def test_lora_through_the_cli_reports_its_adapters_and_the_monitor_rebuilds_it(tmp_path):
    timm = pytest.importorskip("timm")
    from aisec_train.audit.monitor import load_run

    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), tmp_path / "in1k.pth")
    write_image_folder(tmp_path / "imgs", per_class=16)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "model=timm", "model.arch=test_resnet", f"model.checkpoint_path={tmp_path / 'in1k.pth'}",
        "model.trainable=lora", "model.lora.r=4", "dataset=imagefolder", f"dataset.root={tmp_path / 'imgs'}",
        "privacy.target_epsilon=8", "train.batch_size=16", *SMALL, "robustness.eval_samples=8",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = read_report(run_dir)["model"]
    assert model["lora_adapters"]["moved"] == model["lora_adapters"]["adapters"] > 0
    assert model["lora"]["r"] == 4 and model["trainable_parameters"] < model["total_parameters"] / 5
    _, rebuilt = load_run(run_dir)  # the keyed recipe rebuilds the adapted network and loads model.pt into it
    assert sum("lora_B" in n for n, _ in rebuilt.named_parameters()) == model["lora_adapters"]["adapters"]


def test_the_python_api_applies_model_trainable_to_a_model_object(tmp_path):
    """model.trainable is not silently ignored when the model comes as an object: the body stays bit for bit."""
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10, image_size=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = [
        "train.epochs=1",
        "audit=off",
        "robustness.evaluate=false",
        "privacy.target_epsilon=8",
        "model.trainable=fc2",
    ]
    report = aisec_train.run(cfg, model=net, run_dir=tmp_path / "run")
    model = report.get("model")
    assert model["trainable"] == "fc2" and model["trainable_parameters"] < model["total_parameters"]
    released = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    released = {k.removeprefix("model."): v for k, v in released.items()}
    body = [k for k in before if not k.startswith("fc2.")]
    assert body and all(torch.equal(released[k], before[k]) for k in body)
    assert not torch.equal(released["fc2.weight"], before["fc2.weight"])


def test_pretrained_with_a_model_object_is_refused(tmp_path):
    net = SmallCNN(in_channels=1, num_classes=10, image_size=8)
    with pytest.raises(ConfigError, match="model.pretrained=true is not allowed with a model object"):
        aisec_train.run(["model.pretrained=true", "audit=off"], model=net, run_dir=tmp_path / "run")
