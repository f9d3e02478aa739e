"""DP fine-tuning of a small transformer on text (issue 23): DP-LoRA vs non-private LoRA vs DP full fine-tuning.

The corpus is real text that installed packages ship: the first paragraph of the docstrings of public numpy,
torch, scipy and scikit-learn callables. The "public" task (numpy vs torch docstrings) pretrains, without DP, a
2-layer BERT built from a config with a WordPiece tokenizer trained on the public texts; the "private" task (scipy
vs scikit-learn) is then fine-tuned at epsilon 8 with LoRA (r=8 on query/value, plus the head), non-privately
with LoRA, and with DP on every weight. Each variant runs in its own process (peak RSS is its own).
Writes benchmarks/results/cpu/finetune_text.json.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/figures/finetune_text.py --epochs 10 --seeds 0 1
"""

from __future__ import annotations

import importlib
import inspect
import json
import multiprocessing as mp
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from aisec_train.errors import RefusingParser
from aisec_train.preflight import output_file

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "benchmarks" / "results" / "cpu" / "finetune_text.json"
GROUPS = {
    "numpy": ["numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.ma"],
    "torch": ["torch", "torch.nn", "torch.nn.functional", "torch.linalg"],
    "scipy": ["scipy.stats", "scipy.signal", "scipy.optimize", "scipy.linalg", "scipy.special"],
    "sklearn": ["sklearn.metrics", "sklearn.linear_model", "sklearn.preprocessing", "sklearn.model_selection",
                "sklearn.cluster", "sklearn.ensemble", "sklearn.decomposition", "sklearn.feature_selection",
                "sklearn.neighbors", "sklearn.svm", "sklearn.tree", "sklearn.utils"],
}  # fmt: skip
VARIANTS = {"dp_lora": ("lora", True), "nonprivate_lora": ("lora", False), "dp_full": ("all", True)}
MAX_LENGTH = 40


def docstrings(package: str, limit: int) -> list[str]:
    found: set[str] = set()
    for name in GROUPS[package]:
        module = importlib.import_module(name)
        for attr in dir(module):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not callable(obj):
                continue
            owner = getattr(obj, "__module__", None) or ""
            doc = inspect.getdoc(obj) if owner.split(".")[0] == package else None
            first = " ".join(doc.split("\n\n")[0].split()) if doc else ""
            if len(first) > 20:
                found.add(first[:300])
    texts = sorted(found)
    random.Random(0).shuffle(texts)
    return texts[:limit]


def task(a: str, b: str, seed: int, per_class: int) -> tuple[list, list]:
    rows = [(t, 0) for t in docstrings(a, per_class)] + [(t, 1) for t in docstrings(b, per_class)]
    random.Random(seed).shuffle(rows)
    cut = int(0.8 * len(rows))
    return rows[:cut], rows[cut:]


def build_pretrained(folder: Path, seed: int, epochs: int, per_class: int) -> dict:
    """Tokenizer and BERT trained on the public task (no DP), saved with save_pretrained."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    import aisec_train
    from aisec_train.data.text import TextDataset
    from aisec_train.models.hf import HFClassifier
    from aisec_train.train.loop import accuracy, train

    public_train, public_test = task("numpy", "torch", seed, per_class)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(
        [t for t, _ in public_train], trainers.WordPieceTrainer(vocab_size=2000, special_tokens=special)
    )
    ids = [("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=ids)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
    config = transformers.BertConfig(vocab_size=fast.vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                     num_labels=2)  # fmt: skip
    torch.manual_seed(seed)
    bert = transformers.BertForSequenceClassification(config)
    model = HFClassifier(bert, fast.pad_token_id)
    cfg = aisec_train.compose(["privacy=none", "optimizer=adamw", "train.lr=0.001", f"train.epochs={epochs}",
                               "train.batch_size=32", "train.ema_decay=0", f"train.seed={seed}"])  # fmt: skip
    result = train(model, TextDataset(public_train, fast, MAX_LENGTH), train_cfg=cfg.train, privacy_cfg=cfg.privacy,
                   device=torch.device("cpu"), optimizer=cfg.optimizer, progress=False)  # fmt: skip
    bert.save_pretrained(folder)
    fast.save_pretrained(folder)
    acc = accuracy(result.model, TextDataset(public_test, fast, MAX_LENGTH), torch.device("cpu"))
    return {"public_test_accuracy": acc, "public_records": len(public_train)}


def fine_tune(
    variant: str, folder: str, seed: int, epochs: int, epsilon: float, per_class: int, lr: float, queue
) -> None:
    import aisec_train
    from aisec_train.data.text import TextDataset
    from aisec_train.models import ModelFactory
    from aisec_train.models.finetune import check_adapters_moved
    from aisec_train.models.hf import load_tokenizer
    from aisec_train.privacy.engine import quiet_known_warnings
    from aisec_train.train.loop import accuracy, train

    quiet_known_warnings()
    trainable, private = VARIANTS[variant]
    private_train, private_test = task("scipy", "sklearn", seed, per_class)
    tokenizer = load_tokenizer(folder)
    spec = {"_target_": "aisec_train.models.hf.hf_model", "path": folder, "trainable": trainable,
            "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]}}  # fmt: skip
    factory = ModelFactory(spec, (1, 1, MAX_LENGTH), 2, private=private)
    model = factory(seed=seed)
    privacy = [f"privacy.target_epsilon={epsilon}"] if private else ["privacy=none"]
    cfg = aisec_train.compose([*privacy, "optimizer=adamw", f"train.lr={lr}", f"train.epochs={epochs}",
                               "train.batch_size=64", "train.ema_decay=0", f"train.seed={seed}"])  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    data = TextDataset(private_train, tokenizer, MAX_LENGTH)
    result = train(model, data, train_cfg=cfg.train, privacy_cfg=cfg.privacy, device=torch.device("cpu"),
                   optimizer=cfg.optimizer, progress=False)  # fmt: skip
    seconds = time.perf_counter() - started
    # non-private: every epoch is ceil(n / batch) steps; under DP the ledger counts the Poisson-sampled steps
    steps = result.ledger.steps if result.ledger is not None else epochs * -(-len(private_train) // 64)
    queue.put({
        "variant": variant, "seed": seed,
        "accuracy": accuracy(result.model, TextDataset(private_test, tokenizer, MAX_LENGTH), torch.device("cpu")),
        "epsilon": result.ledger.epsilon() if result.ledger is not None else None,
        "grad_sample_mode": result.grad_sample_mode, "steps": steps,
        "step_seconds": round(seconds / max(1, steps), 4), "train_seconds": round(seconds, 2),
        "peak_rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024, 1),
        "trainable_parameters": factory._tuned["trainable_parameters"],
        "total_parameters": factory._tuned["total_parameters"],
        "adapters": check_adapters_moved(result.model),
        "private_records": len(private_train),
    })  # fmt: skip


def main() -> None:
    parser = RefusingParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.005, help="AdamW learning rate of the fine-tuning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=output_file, default=OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    ctx = mp.get_context("spawn")
    rows, public = [], {}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            folder = Path(work) / f"bert_{seed}"
            public[seed] = build_pretrained(folder, seed, args.pretrain_epochs, args.per_class)
            for variant in VARIANTS:
                queue = ctx.Queue()
                proc = ctx.Process(target=fine_tune, args=(variant, str(folder), seed, args.epochs, args.epsilon,
                                                           args.per_class, args.lr, queue))  # fmt: skip
                proc.start()
                rows.append(queue.get())
                proc.join()
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        summary[v] = {"accuracy_mean": sum(r["accuracy"] for r in mine) / len(mine),
                      "step_seconds_median": sorted(r["step_seconds"] for r in mine)[len(mine) // 2]}  # fmt: skip
    result = {
        "what": "docstring corpus (installed numpy/torch/scipy/sklearn): 2-layer BERT (hidden 64) pretrained without "
        "DP on numpy-vs-torch, fine-tuned on scipy-vs-sklearn; DP at epsilon "
        f"{args.epsilon}",
        "corpus": "real text shipped by installed packages (first docstring paragraph of public callables)",
        "epochs": args.epochs, "lr": args.lr, "seeds": args.seeds, "public": public, "summary": summary, "rows": rows,
        "note": "CPU, shared machine: times are noisy; peak RSS growth is measured in each variant's own process",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
