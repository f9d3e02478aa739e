"""PGD-10 throughput: aisec-train vs torchattacks (and ART when installed) vs the floor, plus the fused
update.

PGD-10 at eps 8/255, step 2/255, one random start, on the default ``cnn`` at 1x8x8 (digits-like) and on
``resnet18_gn`` at 3x32x32, same model weights for every implementation. The floor is what no PGD-10 can beat:
10 x (forward + backward to the input). Rows carry ``images_per_s``; ``ours_vs_torchattacks_<model>`` is
torchattacks' time over ours, and the unsuffixed ratios are the default model's.

The micro-benchmark times one PGD update (step, project, clamp) on a (N, 3, 32, 32) batch: the fused kernel
(Triton on CUDA), our torch reference, and the eager chain torchattacks runs, with achieved GB/s counting the
bytes a fused pass must move (read x, x_nat, grad; write x').

    python benchmarks/pgd.py --quick --out pgd.json
"""

from __future__ import annotations

import importlib.util

import torch
from aisec_kernels.pgd_update import pgd_update, pgd_update_reference
from common import emit, parse_args, ratio, time_it
from torch import nn
from torch.nn import functional as F

from aisec_train.models import build_model
from aisec_train.robust import graphed_pgd, pgd

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10
H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3 peak of the H100 SXM


def _setups(quick: bool) -> list[tuple[str, dict, int]]:
    return [
        ("cnn", dict(in_channels=1, num_classes=10, image_size=8), 512),
        ("resnet18_gn", dict(in_channels=3, num_classes=10, image_size=32), 2 if quick else 128),
    ]


def _floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """STEPS x (forward + input-gradient backward), parameters frozen: the work any PGD-STEPS must do."""
    for p in model.parameters():
        p.requires_grad_(False)
    xa = x.clone().requires_grad_(True)
    for _ in range(STEPS):
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
    for p in model.parameters():
        p.requires_grad_(True)


def _art_attack(model: nn.Module, x: torch.Tensor, num_classes: int):
    if importlib.util.find_spec("art") is None:
        return None
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )
    attack = ProjectedGradientDescentPyTorch(
        clf,
        norm=np.inf,
        eps=EPS,
        eps_step=ALPHA,
        max_iter=STEPS,
        num_random_init=1,
        batch_size=len(x),
        verbose=False,
    )
    x_np = x.cpu().numpy()  # ART works on numpy arrays: its transfers are part of its cost
    return lambda y: attack.generate(x=x_np, y=np.eye(num_classes, dtype=np.float32)[y.cpu().numpy()])


def _attack_impls(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, device: str) -> dict:
    import torchattacks

    kw = dict(eps=EPS, step_size=ALPHA, steps=STEPS)
    impls = {"ours_torch": lambda: pgd(model, x, y, **kw, backend="torch")}
    if device.startswith("cuda"):
        impls["ours_triton"] = lambda: pgd(model, x, y, **kw, backend="triton")
        graphed = graphed_pgd(model, x, y, **kw, backend="triton")
        impls["ours_triton_cudagraph"] = lambda: graphed(x, y)
        graphed_bf16 = graphed_pgd(model, x, y, **kw, backend="triton", autocast_bf16=True)
        impls["ours_triton_cudagraph_bf16"] = lambda: graphed_bf16(x, y)
        compiled = _compiled_attack(model, x, y, kw)
        if compiled is not None:
            impls["ours_compiled_cudagraph_bf16"] = lambda: compiled(x, y)
    ta = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
    impls["torchattacks"] = lambda: ta(x, y)
    art = _art_attack(model, x, num_classes)
    if art is not None:
        impls["art"] = lambda: art(y)
    impls["floor"] = lambda: _floor(model, x, y)
    if device.startswith("cuda"):
        impls["floor_cudagraph"] = _graphed(lambda: _floor(model, x, y))
    return impls


def _compiled_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kw: dict):
    """PGD on ``torch.compile(model)`` (Inductor fuses GroupNorm and activations), bf16, in a CUDA graph.

    A user gets this by passing a compiled model to ``pgd``/``graphed_pgd``; compilation can fail on a given
    stack, in which case the row is left out and said so.
    """
    try:
        compiled_model = torch.compile(model)
        graphed = graphed_pgd(compiled_model, x, y, **kw, backend="triton", autocast_bf16=True)
        graphed(x, y)
        return graphed
    except Exception as err:  # noqa: BLE001 - an optional row; the benchmark goes on without it
        print(f"torch.compile variant skipped: {type(err).__name__}: {str(err)[:300]}")
        return None


def _graphed(fn):
    """``fn`` captured in a CUDA graph: the floor without launch overhead, to compare graphed PGD against."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_interleaved(impls: dict, device: str, *, rounds: int, repeats: int) -> dict[str, float]:
    """Best-of-rounds median time per impl; impls take turns, so drift on a shared box hits each alike."""
    best = dict.fromkeys(impls, float("inf"))
    for r in range(rounds):
        for impl, fn in impls.items():
            best[impl] = min(best[impl], time_it(fn, device, repeats=repeats, warmup=2 if r == 0 else 0))
    return best


def bench_attacks(device: str, quick: bool) -> list[dict]:
    rows = []
    for name, shape, batch in _setups(quick):
        torch.manual_seed(0)
        model = build_model(name, **shape).to(device).eval()
        x = torch.rand(batch, shape["in_channels"], shape["image_size"], shape["image_size"], device=device)
        y = torch.randint(0, shape["num_classes"], (batch,), device=device)
        impls = _attack_impls(model, x, y, shape["num_classes"], device)
        times = _time_interleaved(impls, device, rounds=3, repeats=2 if quick else 10)
        for impl, seconds in times.items():
            row = dict(impl=impl, model=name, batch=batch, seconds=seconds, images_per_s=batch / seconds)
            row["fooled"] = _fooled(model, impls[impl](), y)
            rows.append(row)
    return rows


@torch.no_grad()
def _fooled(model: nn.Module, x_adv, y: torch.Tensor) -> float | None:
    """Fraction of the batch the attack's output misclassifies (fp32 model): equal strength, checked."""
    if x_adv is None:  # a floor: no adversarial output
        return None
    x_adv = torch.as_tensor(x_adv, device=y.device)
    return float((model(x_adv).argmax(1) != y).float().mean())


def _eager_chain(x, x_nat, grad):
    # torchattacks' PGD update, op for op
    adv = x + ALPHA * grad.sign()
    delta = torch.clamp(adv - x_nat, min=-EPS, max=EPS)
    return torch.clamp(x_nat + delta, min=0, max=1)


def bench_update(device: str, quick: bool) -> list[dict]:
    n = 256 if quick else 8192
    x_nat = torch.rand(n, 3, 32, 32, device=device)
    x = (x_nat + EPS * (2 * torch.rand_like(x_nat) - 1)).clamp(0, 1)
    grad = torch.randn_like(x)
    impls = {
        "pgd_update_eager_torch": lambda: _eager_chain(x, x_nat, grad),
        "pgd_update_torch_reference": lambda: pgd_update_reference(x, x_nat, grad, eps=EPS, step_size=ALPHA),
    }
    if device.startswith("cuda"):
        impls["pgd_update_fused_triton"] = lambda: pgd_update(x, x_nat, grad, eps=EPS, step_size=ALPHA)
    moved = 4 * x.numel() * x.element_size()  # the bytes a single fused pass reads and writes
    # Back-to-back calls, one sync per batch of them: kernel time, not the launch latency a sync exposes.
    inner = 20 if device.startswith("cuda") else 1
    rows = []
    for impl, fn in impls.items():
        seconds = time_it(lambda fn=fn: [fn() for _ in range(inner)], device, repeats=5 if quick else 20) / inner
        row = dict(impl=impl, model="pgd_update", batch=n, seconds=seconds, gb_per_s=moved / seconds / 1e9)
        if device.startswith("cuda"):
            row["fraction_of_h100_peak"] = moved / seconds / H100_BANDWIDTH
        rows.append(row)
    return rows


def _threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _threads_option)
    if args.device == "cpu":
        # Tiny per-op work: on a 2-core box (often shared with other jobs) OpenMP synchronisation between
        # threads costs more than it saves; every impl runs with the same thread count.
        torch.set_num_threads(args.threads)
    rows = bench_attacks(args.device, args.quick) + bench_update(args.device, args.quick)
    ours = "ours_triton_cudagraph" if args.device.startswith("cuda") else "ours_torch"
    ratios = {}
    for name, _, _ in _setups(args.quick):
        ratios[f"ours_vs_torchattacks_{name}"] = ratio(rows, ours, "torchattacks", model=name)
        ratios[f"ours_vs_floor_{name}"] = ratio(rows, ours, "floor", model=name)
        if any(r["impl"] == "art" for r in rows):
            ratios[f"ours_vs_art_{name}"] = ratio(rows, ours, "art", model=name)
        if args.device.startswith("cuda"):
            ratios[f"ours_vs_floor_cudagraph_{name}"] = ratio(rows, ours, "floor_cudagraph", model=name)
            ratios[f"ours_bf16_vs_torchattacks_{name}"] = ratio(
                rows, "ours_triton_cudagraph_bf16", "torchattacks", model=name
            )
            ratios[f"ours_eager_vs_torchattacks_{name}"] = ratio(rows, "ours_triton", "torchattacks", model=name)
            if any(r["impl"] == "ours_compiled_cudagraph_bf16" and r["model"] == name for r in rows):
                ratios[f"ours_compiled_bf16_vs_torchattacks_{name}"] = ratio(
                    rows, "ours_compiled_cudagraph_bf16", "torchattacks", model=name
                )
    ratios["ours_vs_torchattacks"] = ratios["ours_vs_torchattacks_cnn"]
    ratios["ours_vs_floor"] = ratios["ours_vs_floor_cnn"]
    fused = "pgd_update_fused_triton" if args.device.startswith("cuda") else "pgd_update_torch_reference"
    ratios["fused_update_vs_eager"] = ratio(rows, fused, "pgd_update_eager_torch")
    for row in rows:
        row["ours_impl"] = row["impl"] == ours
    emit("pgd", args.device, rows, ratios, args.out)


if __name__ == "__main__":
    main()
