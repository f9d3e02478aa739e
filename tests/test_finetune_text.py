"""DP fine-tuning of Hugging Face text classifiers (issue 23): local files, a tiny BERT built from a config and a
WordPiece tokenizer trained here, saved with save_pretrained; nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

import aisec_train
from aisec_train.data.errors import DataError
from aisec_train.errors import ConfigError
from aisec_train.models import ModelFactory
from aisec_train.models.finetune import check_adapters_moved
from aisec_train.train.loop import train

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
HF = "aisec_train.models.hf.hf_model"
WORDS = {0: ["bad", "awful", "poor", "sad"], 1: ["great", "good", "lovely", "happy"]}


def _rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    filler = ["the", "a", "movie", "film", "was", "plot"]
    rows = []
    for i in range(n):
        label = i % 2
        picks = torch.randint(0, 4, (3,), generator=g).tolist() + torch.randint(0, 6, (3,), generator=g).tolist()
        words = [WORDS[label][k] for k in picks[:3]] + [filler[k] for k in picks[3:]]
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with a 5-class head and its WordPiece tokenizer, saved like a Hub folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(
        [r["text"] for r in _rows(64)], trainers.WordPieceTrainer(vocab_size=80, special_tokens=special)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
    config = transformers.BertConfig(vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                     num_labels=5)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    rows = _rows(96)
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:64]) + "\n")
    (folder / "test.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows[64:]))
    return folder


def test_records_are_read_from_jsonl_and_csv_and_identified_by_normalised_content(text_files):
    from aisec_train.data.text import read_records, text_digest

    train_rows, test_rows = read_records(text_files / "train.jsonl"), read_records(text_files / "test.csv")
    assert len(train_rows) == 64 and len(test_rows) == 32 and all(isinstance(y, int) for _, y in test_rows)
    assert train_rows[0] == tuple(_rows(1)[0].values())
    same = text_digest("  Caf\u0065\u0301 was\tgood\n", 1)
    assert same == text_digest("Caf\u00e9 was good", 1) and len(same) == 16  # NFC, white space collapsed
    assert same != text_digest("Caf\u00e9 was good", 0) and same != text_digest("cafe was good", 1)


def test_bad_text_files_are_refused_in_one_line(tmp_path):
    from aisec_train.data.text import read_records

    with pytest.raises(ConfigError, match="a .jsonl or .csv file"):
        read_records(tmp_path / "x.txt")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine", "label": "positive"}) + "\n")
    with pytest.raises(DataError, match="row 0: 'label' must be an integer class index, got 'positive'"):
        read_records(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_dp_fine_tuning_of_a_tiny_bert_under_every_grad_sample_mode(tiny_bert, text_files, mode, trainable):
    from aisec_train.data.text import TextDataset, read_records
    from aisec_train.models.hf import load_tokenizer

    data = TextDataset(read_records(text_files / "train.jsonl"), load_tokenizer(str(tiny_bert)), max_length=12)
    spec = {"_target_": HF, "path": str(tiny_bert), "trainable": trainable,
            "lora": {"r": 4, "target_modules": ["query", "value"]}}  # fmt: skip
    factory = ModelFactory(spec, (1, 1, 12), 2, private=True)
    model = factory(seed=0)
    tuned = factory._tuned
    assert tuned["reinitialized_layers"] == ["model.classifier"]  # the saved 5-class head does not fit 2 classes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = aisec_train.compose(["train.epochs=1", "train.batch_size=16", f"privacy.grad_sample_mode={mode}",
                               "privacy.target_epsilon=8"])  # fmt: skip
    result = train(
        model, data, train_cfg=cfg.train, privacy_cfg=cfg.privacy, device=torch.device("cpu"), progress=False
    )
    assert result.ledger.steps > 0 and result.grad_sample_mode == mode
    after = result.model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    if trainable == "lora":
        assert check_adapters_moved(result.model) == {"adapters": 4, "moved": 4}
        assert all("lora_" in k or k.startswith("model.classifier.") for k in moved)  # the base stays frozen
        assert tuned["trainable_parameters"] < tuned["total_parameters"] / 10
    else:
        assert "model.bert.embeddings.word_embeddings.weight" in moved and "model.classifier.weight" in moved


def test_lora_on_an_embedding_is_refused_under_dp_before_any_step(tiny_bert, text_files):
    """peft's Embedding adapter keeps its weights in ParameterDicts Opacus never sees per sample: DP training used to
    open the ledger and then crash with a traceback at the first step (every grad-sample mode). Refused at the
    factory (which the data stage calls before training) in one line; without DP it still trains."""
    from aisec_train.data.text import TextDataset, read_records
    from aisec_train.models.hf import load_tokenizer

    spec = {"_target_": HF, "path": str(tiny_bert), "trainable": "lora",
            "lora": {"r": 4, "target_modules": ["word_embeddings", "query"]}}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        ModelFactory(spec, (1, 1, 12), 2, private=True)(seed=0)
    line = str(err.value)
    assert "\n" not in line and "word_embeddings" in line and "(Embedding)" in line and "allowed: Linear" in line
    model = ModelFactory(spec, (1, 1, 12), 2, private=False)(seed=0)  # no per-sample gradients needed: it trains
    data = TextDataset(read_records(text_files / "train.jsonl"), load_tokenizer(str(tiny_bert)), max_length=12)
    cfg = aisec_train.compose(["privacy=none", "train.epochs=1", "train.batch_size=16"])
    result = train(model, data, train_cfg=cfg.train, device=torch.device("cpu"), progress=False)
    assert check_adapters_moved(result.model)["moved"] > 0


def test_remote_code_is_off_by_default_and_a_missing_folder_is_one_line(tmp_path, tiny_bert):
    import inspect

    from aisec_train.models.hf import hf_model

    assert inspect.signature(hf_model).parameters["trust_remote_code"].default is False
    with pytest.raises(ConfigError) as err:
        hf_model(str(tmp_path / "nothing"), num_classes=2)
    assert "model.path=" in str(err.value) and "\n" not in str(err.value)
