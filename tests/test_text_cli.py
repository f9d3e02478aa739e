"""Text classification end to end (issue 23, item 3): ``model=hf dataset=text`` through the CLI and the Python API.

A tiny BERT built from a config and its WordPiece tokenizer, saved with save_pretrained in one folder (H7's
fixtures in test_finetune_text.py); nothing is downloaded. Every checklist item is answered, and no stage that
works on images claims a result on token ids: those items are ``not_applicable`` with the reason.
"""

from __future__ import annotations

import json

import pytest

import aisec_train
from aisec_train.errors import ConfigError
from aisec_train.store.errors import BudgetError
from tests.conftest import read_report, run_cli
from tests.test_finetune_text import _rows, text_files, tiny_bert  # noqa: F401 - fixtures used by name

pytest.importorskip("transformers")
pytest.importorskip("peft")

# Image-only stages: what each must answer on text, never "pass" (text_run.py).
NOT_APPLICABLE = {
    "sanity checks before training (NaN/inf, range, labels, balance, duplicates, outliers)": "text inputs",
    "tested against evasion attacks": "embedding-space PGD not implemented",
    "robust accuracy not inflated by gradient masking": "embedding-space PGD not implemented",
    "model-extraction test": "text inputs",
    "input sanitisation evaluated under an adaptive attack": "text inputs",
    "guarded query interface refuses malformed and over-rate queries": "text inputs",
    "baseline input and confidence statistics saved with the model": "text inputs",
    "drift check flags shifted batches (noise, rotation, occlusion) and not a clean one": "text inputs",
}
QUICK = ["train.epochs=2", "train.batch_size=16", "dataset.max_length=16", "privacy.target_epsilon=8",
         "audit.membership.reference_models=0"]  # fmt: skip


def _args(bert, files, trainable: str) -> list[str]:
    return ["model=hf", f"model.path={bert}", f"model.trainable={trainable}", "dataset=text",
            f"dataset.path={files / 'train.jsonl'}", f"dataset.test_path={files / 'test.csv'}", *QUICK]  # fmt: skip


def _assert_text_report(report: dict, trainable: str) -> None:
    items = {c["item"]: c for c in report["checklist"]}
    for item, reason in NOT_APPLICABLE.items():
        assert items[item]["status"] == "not_applicable" and reason in items[item]["evidence"], items[item]
    dp = items["differentially private training (DP-SGD)"]
    assert dp["status"] == "pass" and 0 < report["privacy"]["epsilon"] <= 8.0 and report["privacy"]["steps"] > 0
    membership = items["membership-inference audit"]  # it runs on token ids: the loss attack on real losses
    assert membership["status"] in ("pass", "fail") and report["audit"]["membership"]["members"] > 0
    records = report["data"]["records"]
    assert records["n"] == 64 and "text" in records["identity"]  # 64 training records, named by their text
    assert report["privacy"]["budget"]["records"]["n"] == 64  # the dataset budget is charged per text record
    assert report["data"]["shape"] == [16] and report["model"]["trainable"] == trainable
    if trainable != "as given":  # built from model.path: a 5-class head re-initialised for a 2-class task
        assert report["model"]["reinitialized_layers"] == ["model.classifier"]
    assert report["robustness"]["robust_accuracy"] is None and report["audit"]["extraction"]["not_applicable"]
    assert 0.0 <= report["metrics"]["clean_accuracy"] <= 1.0


@pytest.mark.slow
def test_dp_lora_on_text_runs_end_to_end_through_the_cli(tiny_bert, text_files, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    proc = run_cli(*_args(tiny_bert, text_files, "lora"), f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(run_dir)
    _assert_text_report(report, "lora")
    assert report["model"]["lora_adapters"]["moved"] == report["model"]["lora_adapters"]["adapters"] > 0
    security = (run_dir / "security_report.md").read_text()
    assert "Not applicable: text inputs" in security and (run_dir / "model.pt").is_file()


@pytest.mark.slow
def test_dp_full_fine_tuning_on_text_through_the_python_api(tiny_bert, text_files, tmp_path):  # noqa: F811
    report = aisec_train.run(_args(tiny_bert, text_files, "all"), run_dir=tmp_path / "run")
    _assert_text_report(report.to_dict(), "all")
    model = report.get("model")
    assert model["trainable_parameters"] == model["total_parameters"]


def test_the_api_takes_a_hf_model_object_with_the_tokenizer_named(tiny_bert, text_files, tmp_path):  # noqa: F811
    from aisec_train.models.hf import hf_model

    overrides = [o for o in _args(tiny_bert, text_files, "all") if not o.startswith("model")]
    canaries = ["audit.privacy_audit=true", "audit.canaries.m=20"]  # the one-run audit, random-label records
    report = aisec_train.run([*overrides, *canaries, f"dataset.tokenizer={tiny_bert}"],
                             model=hf_model(str(tiny_bert), 2), run_dir=tmp_path / "run")  # fmt: skip
    _assert_text_report(report.to_dict(), "as given")  # the fast companion of the two slow end-to-end runs
    audit = report.get("audit.privacy_audit")
    assert audit["canary_kind"] == "mislabel" and audit["m"] == 20 and audit["claimed_epsilon"] <= 8.0
    item = next(c for c in report.to_dict()["checklist"] if c["item"].startswith("empirical privacy audit"))
    assert item["status"] in ("pass", "fail") and "20 mislabel canaries" in item["evidence"]


def test_the_same_text_is_the_same_record_for_the_dataset_budget(tiny_bert, tmp_path):  # noqa: F811
    """A re-export of the same records with other white space and order is charged as the same records: once the
    first file's budget is spent, a run on the second is refused (data/text.py text_digest, privacy/record_sets.py)."""
    rows = _rows(40)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    respaced = [{"text": "  " + r["text"].replace(" ", "\t "), "label": r["label"]} for r in reversed(rows)]
    second.write_text("\n".join(json.dumps(r) for r in respaced) + "\r\n")
    base = ["model=hf", f"model.path={tiny_bert}", "dataset=text", "audit=off", "train.epochs=1", *QUICK[1:4]]
    one = aisec_train.run([*base, f"dataset.path={first}"], run_dir=tmp_path / "one")
    assert one.get("privacy.epsilon") > 7.0  # the records' budget (8) is all but spent
    with pytest.raises(BudgetError, match=r"record\(s\) of dataset \w+ that dataset\(s\) \w+ also hold"):
        aisec_train.run([*base, f"dataset.path={second}"], run_dir=tmp_path / "two")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("robustness=pgd_at", "robustness.mode='pgd_at' is not allowed with dataset=text"),
        ("backdoor=badnets", "backdoor.attack='badnets' is not allowed with dataset=text"),
        ("dataset.max_length=0", "dataset.max_length=0"),
    ],
)
def test_pixel_space_options_are_refused_on_text_before_any_work(tiny_bert, text_files, override, needle, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError) as err:
        aisec_train.run([*_args(tiny_bert, text_files, "all"), override], run_dir=tmp_path / "run")
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_text_key_is_refused_for_an_image_dataset():
    with pytest.raises(ConfigError, match="dataset.max_length=16 is not allowed with dataset=digits"):
        aisec_train.compose(["dataset.max_length=16"])


def test_a_tokenizer_with_ids_past_the_models_embedding_is_refused_before_any_step(tiny_bert, text_files, tmp_path):  # noqa: F811
    """dataset.tokenizer naming another folder whose vocabulary is larger than the model's: the factory's check
    (blank ids) passed, and the first DP step crashed with `IndexError: index out of range in self` after the
    dataset ledger was opened. Refused in one line, nothing charged."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = [f"w{i}" for i in range(300)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    big = tmp_path / "big_tokenizer"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(big)
    rows = [{"text": " ".join(words[200 + (i * 7 + k) % 100] for k in range(4)), "label": i % 2} for i in range(40)]
    (tmp_path / "big.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    store = tmp_path / "ledgers"
    args = ["model=hf", f"model.path={tiny_bert}", "model.trainable=lora", "dataset=text",
            f"dataset.path={tmp_path / 'big.jsonl'}", f"dataset.tokenizer={big}", f"privacy.ledger_store={store}",
            *QUICK]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        aisec_train.run(args, run_dir=tmp_path / "run")
    line = str(err.value)
    assert line.startswith(f"dataset.tokenizer='{big}' is not allowed with this model: it gives dataset.path's")
    assert "input embedding has" in line and "\n" not in line
    assert not (tmp_path / "run" / "checkpoints").exists()
    records = [r for f in store.rglob("*.json") for r in json.loads(f.read_text())["records"]]
    steps = [r for r in records if r.get("kind") == "charge"]
    assert steps == []  # nothing charged
