"""Mixed ghost clipping's per-layer choice (Bu et al. 2022), extended with book-keeping (Bu et al. 2023).

For a matmul-shaped layer with ``T`` positions per sample, input width ``Da`` and output width ``Dg`` (per
group), the three ways to get the per-sample norms and then the clipped sum cost, in multiply-adds per sample:

* ``ghost``: Gram norms ``T^2 (Da + Dg)``, then the clipped sum ``a^T (c * g)`` from the kept tensors,
  ``T Da Dg`` (the non-private weight gradient, reweighted);
* ``instantiate`` (stored): per-sample gradients ``T Da Dg``, kept, so the clipped sum is a weighted reduce,
  ``Da Dg``; this needs ``groups * Da * Dg`` floats per sample, allowed only up to ``mem_factor`` times what
  the layer's input and output gradient take (so the private step stays near non-private memory);
* ``instantiate`` (recomputed): a fused norm of ``T Da Dg`` that stores nothing, then the reweighted
  weight gradient, ``T Da Dg``.

>>> choose(t=1, da=256, dg=64, groups=1, kept=320).method    # a Linear on (B, d): ghost is O(d)
'ghost'
>>> choose(t=1024, da=576, dg=64, groups=1, kept=1024 * 128).method  # an early conv: many positions
'instantiate'
"""

from __future__ import annotations

from dataclasses import dataclass

# Per-sample gradients may take up to this many times the layer's kept (input + grad) floats. At 1 storing them
# never costs more memory than keeping the captured tensors would. 1.5 stores the MLP-Mixer's channel Linears: its
# step goes from 1.35x to 1.23x non-private, but its peak memory from 1.13-1.16x to 1.45-1.50x, over the 1.3x bar
# (the first are made while the forward's activations are still held; docs/privacy.md, "Stored per-sample
# gradients for the mixer's channel Linears").
MEM_FACTOR = 1.0


@dataclass(frozen=True)
class Choice:
    method: str  # "ghost" or "instantiate"
    store: bool  # instantiate: keep the per-sample gradients (True) or recompute the clipped sum (False)
    why: str


def choose(*, t: int, da: int, dg: int, groups: int, kept: int, mem_factor: float = MEM_FACTOR) -> Choice:
    """The cheapest exact method for one layer's weight; ``kept`` = floats per sample of its input + output grad."""
    ghost = t * t * (da + dg) + t * da * dg
    stored = t * da * dg + da * dg
    recomputed = 2 * t * da * dg
    per_sample = groups * da * dg
    shape = f"T={t} Da={da} Dg={dg}" + (f" groups={groups}" if groups > 1 else "")
    if stored < ghost and per_sample <= mem_factor * kept:
        return Choice("instantiate", True, f"{shape}: per-sample gradients {stored:.3g} < ghost {ghost:.3g} MAC")
    if recomputed < ghost:
        why = f"{shape}: fused per-sample norm {recomputed:.3g} < ghost {ghost:.3g} MAC (too big to keep)"
        return Choice("instantiate", False, why)
    if stored < ghost:  # cheaper, but the per-sample gradients would not fit beside the kept tensors
        why = (
            f"{shape}: ghost {ghost:.3g} <= fused per-sample norm {recomputed:.3g} MAC (stored per-sample "
            f"gradients, {stored:.3g} MAC, would take {per_sample} floats per sample > {mem_factor:g} x {kept} kept)"
        )
        return Choice("ghost", False, why)
    return Choice("ghost", False, f"{shape}: ghost {ghost:.3g} <= per-sample {stored:.3g} MAC")
