"""Files a run leaves beside report.json: metrics.csv, training_curve.png and model_card.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from aisec_train.report.budget_text import budget_lines  # noqa: E402
from aisec_train.report.report import Report  # noqa: E402
from aisec_train.store import atomic_write, safe_open_for_write  # noqa: E402


def write_json(obj: Any, path: Path) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True), root=path.parent)


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG inside its folder, written atomically and never through a symlink."""
    with safe_open_for_write(path, root=path.parent, mode="wb") as fh:
        fig.savefig(fh, format="png", dpi=100)


def write_all(report: Report, history: list[dict[str, Any]], run_dir: Path) -> None:
    if history:
        write_metrics_csv(history, run_dir / "metrics.csv")
        plot_training_curve(history, run_dir / "training_curve.png")
    atomic_write(run_dir / "model_card.md", model_card(report), root=run_dir)
    report.write(run_dir / "report.json")


def write_metrics_csv(history: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in history for k in row))
    with safe_open_for_write(path, root=path.parent, mode="w") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def plot_training_curve(history: list[dict[str, Any]], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(epochs, [row["loss"] for row in history], label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_acc.plot(epochs, [row["train_accuracy"] for row in history], label="train accuracy")
    if "test_accuracy" in history[0]:
        ax_acc.plot(epochs, [row["test_accuracy"] for row in history], label="test accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    if "epsilon" in history[0]:
        ax_eps = ax_acc.twinx()
        ax_eps.plot(epochs, [row["epsilon"] for row in history], "k--", label="epsilon")
        ax_eps.set_ylabel("epsilon")
        ax_eps.legend(loc="center right")
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _privacy_sentence(privacy: dict[str, Any]) -> str:
    if not privacy or privacy.get("epsilon") is None:
        return "This model was trained **without** differential privacy: it may memorise individual training samples."
    gaps = (privacy.get("guarantee") or {}).get("gaps")
    if gaps:  # privacy/claims.py: reproducible noise or delta >= 1/n void whatever the accountant computed
        return (
            f"**NO DP guarantee holds** for this model: {'; '.join(gaps)}. (The accountant's figures, which bound "
            f"nothing here: ({privacy['epsilon']:.2f}, {privacy['delta']:g}).)"
        )
    if privacy.get("level") == "client":  # federated.dp=client: the unit is a whole client, not a sample
        eps = privacy["epsilon"]
        return (
            f"Trained with client-level differential privacy (DP-FedAvg): ({eps:.2f}, {privacy['delta']:g})-DP "
            f"({privacy['accountant']} accountant, {privacy['steps']} rounds at client sampling rate "
            f"{privacy['sample_rate']:g}, noise multiplier {privacy['noise_multiplier']:.2f}, update clipping at "
            f"{privacy.get('clip_norm')}). In plain words: adding or removing all the data of any one client changes "
            f"the probability of any outcome of training by a factor of at most e^{eps:.2f} ~ {2.718281828**eps:.1f}, "
            f"except with probability {privacy['delta']:g}."
        ) + (f" **Scope:** {privacy['scope']['statement']}" if privacy.get("scope") else "")
    return (
        f"Trained with DP-SGD: ({privacy['epsilon']:.2f}, {privacy['delta']:g})-differential privacy "
        f"({privacy['accountant']} accountant, {privacy['steps']} steps, noise multiplier "
        f"{privacy['noise_multiplier']:.2f}, per-sample clipping at {privacy.get('max_grad_norm')}). In plain words: "
        f"adding or removing any one training sample changes the probability of any outcome of training by a "
        f"factor of at most e^{privacy['epsilon']:.2f} ~ {2.718281828 ** privacy['epsilon']:.1f}, except with "
        f"probability {privacy['delta']:g}."
    ) + (f" **Scope:** {privacy['scope']['statement']}" if privacy.get("scope") else "")


def model_card(report: Report) -> str:
    data, metrics = report.sections.get("data", {}), report.sections.get("metrics", {})
    model, robust = report.sections.get("model", {}), report.sections.get("robustness", {})
    target = str(model.get("target") or model.get("name") or "?")
    fixes = ", ".join(f"{f['module']} {f['from']} -> {f['to']}" for f in model.get("dp_fixes") or []) or "none"
    lines = [
        f"# Model card: {target.rsplit('.', 1)[-1]} on {data.get('name', '?')}",
        "",
        "## Model",
        f"- `{target}` ({model.get('source', 'config')}), arguments {model.get('arguments') or {}}, "
        f"{model.get('parameters', '?')} parameters",
        f"- made trainable by Opacus under DP: {fixes}",
        f"- input normalisation inside the model: {model.get('input_normalization') or 'none'}",
        "",
        "## Intended use",
        "Research and evaluation of privacy-preserving, attack-hardened training. Not validated for decisions "
        "about people; re-run the audits in this card before any deployment.",
        "",
        "## Data",
        f"- dataset: {data.get('name')} ({data.get('n_train')} training / {data.get('n_test')} test samples, "
        f"shape {data.get('shape')}, {data.get('num_classes')} classes)",
        f"- manifest SHA-256: `{data.get('manifest_sha256')}`",
        f"- lineage: {' -> '.join(s['step'] for s in data.get('lineage', []))}",
        f"- sanity findings: {len(data.get('sanity', {}).get('findings', []))}",
        "",
        "## Privacy guarantee",
        _privacy_sentence(report.sections.get("privacy", {})),
        *budget_lines(report),  # the records' total composed spend, the store, a budget stop (report/budget_text)
        "",
        "## Metrics",
        f"- clean test accuracy: {metrics.get('clean_accuracy', float('nan')):.4f}",
    ]
    if robust.get("robust_accuracy") is not None:
        from aisec_train.report.security_report import robust_sample_words

        attack = robust["attack"]
        lines.append(
            f"- robust accuracy: {robust['robust_accuracy']:.4f} under {attack['name'].upper()}-{attack['steps']} "
            f"({attack['norm']}, eps {attack['eps']}, {attack['restarts']} restart(s)){robust_sample_words(report)}"
        )
    lines += [
        f"- checkpoint: `{model.get('path')}` SHA-256 `{model.get('sha256')}`",
        "",
        "## Security checklist",
        "| area | item | status | evidence |",
        "|---|---|---|---|",
        *[f"| {c['area']} | {c['item']} | {_status(c)} | {c['evidence']} |" for c in report.checklist],
        "",
        "## Threat model",
        *_threat_model(report),
        "",
        "## Limitations",
        "- Accuracy and robustness are measured on the held-out split of the same distribution only.",
        "- Robust accuracy is an upper bound: a stronger or adaptive attack may lower it.",
        "- The DP guarantee covers the training data only, and only if the sampling and clipping assumptions "
        "hold (Poisson sampling, per-sample clipping as configured).",
        "",
    ]
    if report.sections.get("privacy", {}).get("not_covered"):
        lines.insert(
            -1,
            "- The DP guarantee covers the released weights; the training curves, the data counts and the audit "
            "figures computed on training records (`privacy.not_covered` in report.json) are released without noise: "
            "share them as you would the training data.",
        )
    return "\n".join(lines)


def _status(item: dict[str, Any]) -> str:
    """A failing item names its fix beside the status, where a reader of the card looks first."""
    return f"{item['status']} (fix: {item['fix']})" if item.get("fix") else item["status"]


def _threat_model(report: Report) -> list[str]:
    from aisec_train.report.security_report import threat_model_markdown  # the table lives with the report

    return threat_model_markdown(report)
