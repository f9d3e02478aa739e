"""The Fine-Pruning figure: clean accuracy and ASR against the fraction of channels pruned."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from aisec_train.store.files import safe_open_for_write  # noqa: E402


def pruning_curve(curve: list[dict[str, float]], chosen: float, after: dict[str, float], path: Path) -> None:
    frac = [r["fraction"] for r in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(frac, [r["test_accuracy"] for r in curve], label="clean accuracy (test)")
    ax.plot(frac, [r["trusted_accuracy"] for r in curve], ":", label="accuracy on trusted data (decides)")
    ax.plot(frac, [r["asr"] for r in curve], label="attack success rate")
    ax.axvline(chosen, color="grey", linestyle="--", label=f"pruned {chosen:.2f}")
    ax.scatter([chosen, chosen], [after["clean_accuracy"], after["asr"]], marker="*", s=90, color="black", zorder=3)
    ax.annotate("after fine-tuning", (chosen, after["clean_accuracy"]), textcoords="offset points", xytext=(6, -12))
    ax.set(xlabel="fraction of feature-layer channels pruned", ylabel="rate", ylim=(-0.02, 1.02))
    ax.set_title("Fine-Pruning")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with safe_open_for_write(path, root=path.parent) as fh:  # atomic, never through a symlink
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
