"""Red-team checks of DP fine-tuning: what an adversary's weights folder, a BatchNorm subclass or a LoRA rank can do.

A tiny BERT and its WordPiece tokenizer (test_finetune_text.py's fixtures) and timm's ``test_efficientnet`` (built
offline); nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import aisec_train
from aisec_train.errors import ConfigError
from aisec_train.models import ModelFactory
from aisec_train.models.finetune import FrozenBatchNorm
from aisec_train.train.loop import train
from tests.test_finetune_text import _rows, text_files, tiny_bert  # noqa: F401 - fixtures used by name

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
HF = "aisec_train.models.hf.hf_model"
BODY = "bert.encoder.layer.0.attention.self.query.weight"


def _copy_with(tiny_bert, tmp_path, change) -> str:  # noqa: F811
    """tiny_bert's folder with its safetensors state changed by ``change(state)``."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert, folder)
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda s: s[BODY].fill_(float("nan")), f"{BODY} holds NaN or inf"),
        (lambda s: s["bert.embeddings.word_embeddings.weight"].__setitem__((3, 0), float("inf")), "holds NaN or inf"),
        (lambda s: s.__setitem__(BODY, torch.zeros(16, 32)), f"{BODY} is (16, 32) in the file, (32, 32) in the model"),
        (lambda s: s.pop(BODY), f"{BODY} is missing from the file"),
    ],
    ids=["nan", "inf", "shape", "missing"],
)
def test_a_weights_folder_whose_body_does_not_fit_or_is_not_finite_is_refused(tiny_bert, tmp_path, change, needle):  # noqa: F811
    """ignore_mismatched_sizes (for a resized head) let transformers re-initialise a body tensor of another shape,
    and a missing one started at random: a damaged or substituted file trained from noise, exit 0. NaN / inf weights
    were loaded, opened the ledger and stopped at the first step's loss ('Lower train.lr'). Only the head may differ."""
    from aisec_train.models.hf import hf_model

    folder = _copy_with(tiny_bert, tmp_path, change)
    with pytest.raises(ConfigError) as err:
        hf_model(folder, num_classes=2)
    line = str(err.value)
    assert needle in line and "model.path=" in line and "\n" not in line
    # the unchanged folder (a 5-class head: another class count) still loads, the head re-initialised
    assert hf_model(str(tiny_bert), num_classes=2).reinitialized_layers == ["model.classifier"]


@pytest.mark.parametrize("given", ["false", "yes", 1])
def test_trust_remote_code_must_be_a_boolean_and_the_folders_code_never_runs(tiny_bert, tmp_path, given):  # noqa: F811
    """transformers reads trust_remote_code by truthiness: model.trust_remote_code='false' ran the folder's Python."""
    from aisec_train.models.hf import hf_model

    folder = tmp_path / "evil"
    shutil.copytree(tiny_bert, folder)
    marker = tmp_path / "ran"
    (folder / "evil_model.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class EvilConfig(BertConfig):\n    model_type = 'bert'\n"
        "class EvilModel(BertForSequenceClassification):\n    config_class = EvilConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig",
                          "AutoModelForSequenceClassification": "evil_model.EvilModel"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model.trust_remote_code=.* is not allowed: true or false"):
        hf_model(str(folder), num_classes=2, trust_remote_code=given)
    hf_model(str(folder), num_classes=2)  # the default: the weights load, the folder's Python does not run
    assert not marker.exists()


def _efficientnet(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", num_classes=3, in_chans=3)
    path = tmp_path / "effnet.pth"
    torch.save(net.state_dict(), path)
    return net.eval(), str(path)


def test_freezing_timms_norm_act_batchnorm_keeps_its_activation(tmp_path):
    """timm's BatchNormAct2d (EfficientNet, MobileNetV3, RegNet) applies drop and act after the norm; its frozen copy
    dropped them, so the checkpoint fine-tuned was another function (outputs off by 16.7 here)."""
    net, path = _efficientnet(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
    spec = {"_target_": "aisec_train.models.timm_model", "arch": "test_efficientnet", "checkpoint_path": path}
    for private in (True, False):
        model = ModelFactory(spec, (3, 32, 32), 3, private=private)(seed=1).eval()
        assert any(isinstance(m, FrozenBatchNorm) for m in model.modules())
        with torch.no_grad():
            assert torch.equal(model(x), expected)


class ScaledBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with a forward of its own (a frozen copy could not reproduce it)."""

    def forward(self, x):
        return 2 * super().forward(x)


class PlainSubclassBatchNorm(nn.BatchNorm2d):
    pass


def _net(norm: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), norm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_a_batchnorm_opacus_does_not_replace_is_refused_under_dp(tmp_path):
    """Opacus validates and replaces BatchNorm by exact type: timm's BatchNormAct2d passed both, and with
    model.trainable=head a DP run (exit 0, 'converted to GroupNorm' in the report) normalised each record by the
    batch's statistics and released running statistics of the private data in model.pt."""
    pytest.importorskip("timm")
    spec = {"_target_": "aisec_train.models.timm_model", "arch": "test_efficientnet", "trainable": "head"}
    with pytest.raises(ConfigError) as err:
        ModelFactory(spec, (3, 16, 16), 3, private=True)(seed=0)
    assert "'bn1' is a BatchNormAct2d" in str(err.value) and "model.batchnorm=freeze" in str(err.value)
    ModelFactory(spec, (3, 16, 16), 3, private=False)(seed=0)  # without DP BatchNorm is kept, as documented
    template = ModelFactory(None, (1, 8, 8), 3, private=True, template=_net(PlainSubclassBatchNorm))
    with pytest.raises(ConfigError, match="is a PlainSubclassBatchNorm, a BatchNorm Opacus does not replace"):
        template(seed=0)


def test_the_way_out_freezing_keeps_running_statistics_through_dp_training():
    """model.batchnorm=freeze, which the refusal above names: no statistic of the private batch is kept."""
    frozen = ModelFactory(None, (1, 8, 8), 3, private=True, template=_net(PlainSubclassBatchNorm),
                          template_tuning={"batchnorm": "freeze"})  # fmt: skip
    model = frozen(seed=0)
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert any("running_mean" in n for n in before)
    cfg = aisec_train.compose(["train.epochs=1", "train.batch_size=8", "privacy.noise_multiplier=4.0",
                               "privacy.target_epsilon=8"])  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    result = train(model, data, train_cfg=cfg.train, privacy_cfg=cfg.privacy, device=torch.device("cpu"),
                   progress=False)  # fmt: skip
    assert result.ledger.steps > 0
    after = dict(result.model.named_buffers())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_freezing_a_batchnorm_subclass_with_its_own_forward_is_refused(tmp_path):
    path = tmp_path / "scaled.pt"
    torch.save(_net(ScaledBatchNorm).state_dict(), path)
    factory = ModelFactory(None, (1, 8, 8), 3, template=_net(ScaledBatchNorm),
                           template_tuning={"checkpoint_path": str(path), "batchnorm": "freeze"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.batchnorm='freeze' is not allowed for '1' \(ScaledBatchNorm\)"):
        factory(seed=0)


def test_a_lora_rank_beyond_every_layers_full_rank_is_refused_before_allocating(tiny_bert):  # noqa: F811
    """peft allocates whatever rank it is given: model.lora.r=100000000 on a 32-wide BERT was killed for memory."""

    def factory(r: int) -> ModelFactory:
        spec = {"_target_": HF, "path": str(tiny_bert), "trainable": "lora", "lora": {"r": r}}
        return ModelFactory(spec, (12,), 2, private=True)

    with pytest.raises(ConfigError) as err:
        factory(10_000)(seed=0)  # (small enough to build, should the refusal ever go)
    assert str(err.value).startswith("model.lora.r=10000 is not allowed: at most 32 for this model")
    assert factory(32)(seed=0) is not None  # the full rank of the widest layer is still allowed


@pytest.mark.parametrize(
    "trainable, lora",
    [("lora", ["query", "value"]), ("lora", ["query", "key", "value", "dense"]), ("all", None),
     ("encoder.layer.1|LayerNorm|classifier", None)],
)  # fmt: skip
def test_bk_per_sample_norms_equal_opacus_hooks_on_every_trainable_parameter(tiny_bert, text_files, trainable, lora):  # noqa: F811
    """The clip bounds each record's influence only if its norm covers every trainable tensor (LoRA A and B, the
    head, LayerNorms, embeddings); padded records of different lengths in one batch. Compared with Opacus' hooks."""
    import copy

    from opacus import GradSampleModule

    from aisec_train.data.text import TextDataset, read_records
    from aisec_train.models.hf import load_tokenizer
    from aisec_train.train.bk import BKGradSampleModule

    data = TextDataset(read_records(text_files / "train.jsonl"), load_tokenizer(str(tiny_bert)), max_length=12)
    x, y = data.ids[:8].clone(), data.labels[:8]
    x[1, 5:], x[2, 3:] = data.pad_token_id, data.pad_token_id  # shorter records
    spec = {"_target_": HF, "path": str(tiny_bert), "trainable": trainable, "lora": {"r": 4, "target_modules": lora}}
    model = ModelFactory(spec, (12,), 2, private=True)(seed=0).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # peft starts B at zero, which would hide A's per-sample gradients
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # the two forwards must compute the same function
    hooks = GradSampleModule(copy.deepcopy(model))
    bk = BKGradSampleModule(model, max_grad_norm=1e9)
    nn.functional.cross_entropy(bk(x), y).backward()
    nn.functional.cross_entropy(hooks(x), y).backward()
    trained = [p for p in hooks.parameters() if p.requires_grad]
    assert all(p.grad_sample is not None for p in trained)
    expected = torch.stack([p.grad_sample.reshape(8, -1).square().sum(1) for p in trained]).sum(0).sqrt()
    torch.testing.assert_close(bk.per_sample_gradient_norms, expected, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_roberta(tiny_bert, tmp_path_factory):  # noqa: F811
    """A RoBERTa body saved without its classification head (as roberta-base is), with tiny_bert's tokenizer."""
    folder = tmp_path_factory.mktemp("roberta")
    config = transformers.RobertaConfig(vocab_size=80, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=40, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert / name, folder / name)
    return folder


def test_a_roberta_keeps_its_own_positions_and_its_whole_fresh_head_trains(tiny_roberta):
    """RoBERTa numbers positions from padding_idx + 1: the wrapper's 0, 1, 2, ... shifted them (another function
    than the checkpoint's). trainable=head trained only the head's out_proj; its dense stayed random and frozen."""
    from aisec_train.models.hf import hf_model

    wrapped = hf_model(str(tiny_roberta), num_classes=2).eval()
    assert wrapped.reinitialized_layers == ["model.classifier.dense", "model.classifier.out_proj"]
    x = torch.tensor([[2, 10, 11, 12, 3, 0, 0], [2, 13, 14, 3, 0, 0, 0]])
    with torch.no_grad():
        own = wrapped.model(input_ids=x, attention_mask=(x != 0).long()).logits
        assert torch.equal(wrapped(x), own)
    factory = ModelFactory({"_target_": HF, "path": str(tiny_roberta), "trainable": "head"}, (7,), 2, private=True)
    model = factory(seed=0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        f"model.classifier.{layer}.{kind}" for layer in ("dense", "out_proj") for kind in ("weight", "bias")
    }
    assert factory._tuned["head"] == "model.classifier"


@pytest.mark.parametrize("trainable", ["head", "lora"])
def test_a_layer_the_checkpoint_lacks_trains_with_the_head(tiny_bert, tmp_path, trainable):  # noqa: F811
    """DistilBERT's base checkpoint has no pre_classifier: with trainable=head it stayed frozen at random weights
    (and trainable=lora put an adapter on that random layer). Re-initialised layers now train with the head."""
    folder = tmp_path / "distilbert"
    config = transformers.DistilBertConfig(vocab_size=80, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=40, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.DistilBertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert / name, folder / name)
    factory = ModelFactory({"_target_": HF, "path": str(folder), "trainable": trainable}, (7,), 2, private=True)
    model = factory(seed=0)
    assert factory._tuned["reinitialized_layers"] == ["model.classifier", "model.pre_classifier"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {
        f"model.{layer}.{kind}" for layer in ("pre_classifier", "classifier") for kind in ("weight", "bias")
    }
    assert not any("pre_classifier.lora" in n for n, _ in model.named_parameters())


def test_a_gpt2_gets_no_token_types_and_trains_under_the_default_private_step(tiny_bert, tmp_path):  # noqa: F811
    """GPT-2 takes token_type_ids but looks them up in its word embedding: the wrapper's zeros added token 0's
    embedding to every position (another function than the checkpoint's), and the second lookup of the embedding
    made the default bk step (falling back to ghost for GPT-2's Conv1D) fail at the first step with a traceback."""
    from aisec_train.data.text import TextDataset
    from aisec_train.models.hf import hf_model, load_tokenizer

    folder = tmp_path / "gpt2"
    config = transformers.GPT2Config(vocab_size=80, n_embd=32, n_layer=1, n_head=2, n_positions=40, pad_token_id=0,
                                     bos_token_id=2, eos_token_id=3)  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert / name, folder / name)
    wrapped = hf_model(str(folder), num_classes=2).eval()
    x = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 5, 3, 0, 0, 0]])
    with torch.no_grad():
        assert torch.equal(wrapped(x), wrapped.model(input_ids=x, attention_mask=(x != 0).long()).logits)
    rows = [(" ".join(["good"] * (1 + i % 3)), i % 2) for i in range(16)]
    data = TextDataset(rows, load_tokenizer(str(folder)), max_length=8)
    model = ModelFactory({"_target_": HF, "path": str(folder)}, (8,), 2, private=True)(seed=0)
    cfg = aisec_train.compose(["train.epochs=1", "train.batch_size=8", "privacy.noise_multiplier=4.0",
                               "privacy.target_epsilon=8"])  # fmt: skip
    result = train(model, data, train_cfg=cfg.train, privacy_cfg=cfg.privacy, device=torch.device("cpu"),
                   progress=False)  # fmt: skip
    assert result.ledger.steps > 0


def test_an_empty_text_file_is_refused_in_a_line_that_says_so(tmp_path):
    """datasets' json parser failed on an empty file with an empty message: '... cannot be read as json:'."""
    from aisec_train.data.errors import DataError
    from aisec_train.data.text import read_records

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl holds no records$"):
        read_records(tmp_path / "empty.jsonl")


def test_pretrained_with_model_hf_is_refused_naming_where_the_weights_come_from(tiny_bert):  # noqa: F811
    """The factory hands model.pretrained=true to any **kwargs target: transformers answered with a TypeError."""
    spec = {"_target_": HF, "path": str(tiny_bert), "pretrained": True}
    with pytest.raises(ConfigError, match="model.pretrained=True is not allowed with model=hf: the weights are model"):
        ModelFactory(spec, (12,), 2)(seed=0)


def test_a_max_length_past_the_models_positions_is_refused_naming_the_key(tiny_bert, tiny_roberta):  # noqa: F811
    """It was refused as "cannot take images of shape (64,): index out of range in self"."""
    for folder, limit in ((tiny_bert, 32), (tiny_roberta, 39)):  # RoBERTa's positions start after padding_idx 0
        ModelFactory({"_target_": HF, "path": str(folder)}, (limit,), 2).check()
        with pytest.raises(ConfigError) as err:
            ModelFactory({"_target_": HF, "path": str(folder)}, (limit + 1,), 2).check()
        assert (
            f"token ids of shape ({limit + 1},): dataset.max_length={limit + 1} is not allowed with this model: "
            f"at most {limit} tokens" in str(err.value)
        )
