"""AutoAttack: aisec-train's evaluation suite against torchattacks' on the same model, samples and budget.

Both run the standard cascade APGD-CE -> APGD-T -> FAB-T -> Square (torchattacks: ``MultiAttack`` of its
``APGD``, ``APGDT``, ``FAB(multi_targeted)``, ``Square``; ours: ``evaluate_robustness(suite="autoattack")``
with the masking checks off, so both do the same work), at AutoAttack's standard budget (100 steps, 9 target
classes, Square 5000 queries) and, in the full run, also at the budget of torchattacks' own ``AutoAttack``
class (10 steps). Rows carry ``robust_accuracy`` (equal strength, checked) and per-attack cascade figures;
``ours_vs_torchattacks`` is torchattacks' time over ours on the default ``cnn`` (above 1: ours is faster).
For reference the report's default suite (``apgd``, masking checks on) and PGD-20 with 2 restarts run on the
same samples: their gap to AutoAttack is how much each over-reports robustness.

Models: ``cnn`` on scikit-learn's digits (8x8), trained here for a few seconds, at the digits radius 0.1; with
``--device cuda`` also ``resnet18_gn`` at 3x32x32 (random weights, random images labelled by the model's own
predictions, eps 1/255 so that part of the batch survives).

:func:`compare` is the comparison on any model and samples (``scripts/figures/robust_eval.py`` runs it on the
pipeline's trained models); it needs nothing from ``benchmarks/common.py``, so it imports from anywhere.

    python benchmarks/autoattack.py --quick --out autoattack.json
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from aisec_train.models import build_model
from aisec_train.robust.evaluation import evaluate_robustness


def _digits_cnn(device: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(data.target)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        perm = torch.randperm(1400)
        for i in range(0, 1400, 64):
            opt.zero_grad()
            F.cross_entropy(model(x[perm[i : i + 64]]), y[perm[i : i + 64]]).backward()
            opt.step()
    return model.to(device).eval(), x[1400 : 1400 + n].to(device), y[1400 : 1400 + n].to(device), 0.1


def _resnet(device: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(0)
    model = build_model("resnet18_gn", in_channels=3, num_classes=10, image_size=32).to(device).eval()
    x = torch.rand(n, 3, 32, 32, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, 1 / 255


# (label, steps, Square queries, torchattacks' own AutoAttack class instead of the MultiAttack cascade)
QUICK_BUDGET = ("quick (10 steps, 300 queries)", 10, 300, False)
STANDARD_BUDGET = ("standard (100 steps, 5000 queries)", 100, 5000, False)
TORCHATTACKS_CLASS_BUDGET = ("torchattacks AutoAttack class", 10, 5000, True)


def _torchattacks(model: nn.Module, eps: float, steps: int, queries: int, *, own_class: bool, n_classes: int = 10):
    import torchattacks

    if own_class:  # torchattacks' AutoAttack: its fixed 10 steps, Square 5000 queries with a rescaled schedule
        return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=0)
    kw = dict(norm="Linf", eps=eps, seed=0)
    return torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, steps=steps, n_restarts=1, loss="ce", **kw),
            torchattacks.APGDT(model, steps=steps, n_classes=n_classes, n_restarts=1, **kw),
            torchattacks.FAB(model, steps=steps, multi_targeted=True, n_classes=n_classes, n_restarts=1, **kw),
            torchattacks.Square(model, n_queries=queries, n_restarts=1, resc_schedule=False, **kw),
        ]
    )


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    started = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - started


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def _best_of(fn, device: str, rounds: int):
    """The output and the fastest of ``rounds`` timed calls (a shared box's drift hits every impl alike)."""
    results = [_timed(fn, device) for _ in range(rounds)]
    return results[0][0], min(seconds for _, seconds in results)


def compare(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    device: str = "cpu",
    budgets: list | tuple = (STANDARD_BUDGET,),
    rounds: int = 1,
    name: str = "model",
    reference_suites: bool = True,
) -> list[dict]:
    """Ours vs torchattacks' AutoAttack on ``model`` and the same ``(x, y)``, one pair of rows per budget (each
    the fastest of ``rounds`` calls); with ``reference_suites`` also our ``apgd`` and ``pgd`` suites' rows.

    Every row: ``impl``, ``budget``, ``model``, ``n``, ``eps``, ``clean_accuracy``, ``seconds``,
    ``robust_accuracy`` (ours also ``after_<attack>``, the cascade's figure after each attack).
    """
    model = model.eval()
    with torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])
    rows = []
    base = dict(model=name, n=len(x), eps=eps, clean_accuracy=_accuracy(model, x, y))
    for budget, steps, queries, own_class in budgets:
        attack = _torchattacks(model, eps, steps, queries, own_class=own_class, n_classes=n_classes)
        kw = dict(suite="autoattack", norm="linf", eps=eps, steps=steps, square_queries=queries, masking_checks=False)
        x_adv, theirs = _best_of(lambda attack=attack: attack(x, y), device, rounds)
        out, ours = _best_of(lambda kw=kw: evaluate_robustness(model, x, y, **kw), device, rounds)
        rows.append(
            dict(impl="torchattacks", budget=budget, **base, seconds=theirs, robust_accuracy=_accuracy(model, x_adv, y))
        )
        per_attack = {f"after_{k}": v["robust_accuracy"] for k, v in out["attacks"].items()}
        rows.append(
            dict(impl="ours", budget=budget, **base, seconds=ours, robust_accuracy=out["robust_accuracy"], **per_attack)
        )
    for suite in ("apgd", "pgd") if reference_suites else ():
        out, seconds = _timed(lambda s=suite: evaluate_robustness(model, x, y, suite=s, norm="linf", eps=eps), device)
        row = dict(impl=f"ours_{suite}_suite", budget="default", **base, seconds=seconds)
        rows.append(
            dict(row, robust_accuracy=out["robust_accuracy"], masking_flagged=out["gradient_masking"]["flagged"])
        )
    return rows


def main() -> None:
    from common import emit, parse_args, ratio  # benchmarks/common.py: the benchmark contract (CLI only)

    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument("--threads", type=int, default=1))
    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # tiny per-op work: extra threads only synchronise
    budgets = [QUICK_BUDGET] if args.quick else [STANDARD_BUDGET, TORCHATTACKS_CLASS_BUDGET]
    setups = [("cnn", _digits_cnn(args.device, 120 if args.quick else 397))]
    if args.device.startswith("cuda"):
        setups.append(("resnet18_gn", _resnet(args.device, 256)))
    rows = []
    for name, (model, x, y, eps) in setups:
        rows += compare(model, x, y, eps, device=args.device, budgets=budgets, rounds=2 if args.quick else 1, name=name)
    ratios = {}
    for name, _ in setups:
        for budget, *_ in budgets:
            key = "" if budget == budgets[0][0] else "_torchattacks_class"
            ratios[f"ours_vs_torchattacks_{name}{key}"] = ratio(rows, "ours", "torchattacks", model=name, budget=budget)
    ratios["ours_vs_torchattacks"] = ratios["ours_vs_torchattacks_cnn"]
    emit("autoattack", args.device, rows, ratios, args.out)


if __name__ == "__main__":
    main()
