"""What the sampled robustness evaluation claims (robust/sampling.py): the 95% Clopper-Pearson interval of a
stratified sample of a finite test split contains the WHOLE split's robust accuracy at least 95% of the time, the
comparison issue 24's evaluation-cost figure makes once per job. Checked by drawing the default sample (500 of a
2k split) under many seeds from a split whose robust records cluster by class, as real ones do."""

from __future__ import annotations

import numpy as np

from aisec_train.robust.sampling import clopper_pearson, stratified_indices


def _split(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    per_class = np.linspace(0.05, 0.8, 10)  # robustness differs a lot between classes
    robust = rng.random(n) < per_class[labels]
    return labels, robust


def test_the_default_samples_interval_covers_the_whole_splits_number():
    labels, robust = _split()
    truth = robust.mean()
    draws = 300
    inside, widths, interval = 0, [], {}
    for seed in range(draws):
        index = stratified_indices(labels, 500, seed)
        assert len(index) == 500
        k = int(robust[index].sum())
        lo, hi = interval[k] if k in interval else interval.setdefault(k, clopper_pearson(k, len(index)))
        inside += lo <= truth <= hi
        widths.append(hi - lo)
    # exact and conservative for a stratified draw without replacement: nominal 95%, so >= 0.93 allows for the
    # 300 draws' own noise (binomial sd ~0.013) while a 90% or a naive too-narrow interval would fail
    assert inside / draws >= 0.93, inside / draws
    assert 0.06 < float(np.mean(widths)) < 0.10  # the width 500 samples buy around 0.4: ~±4 points


def test_a_sample_as_large_as_the_split_is_the_split():
    labels, robust = _split(300)
    index = stratified_indices(labels, 500, 0)
    assert index.tolist() == list(range(300))
    lo, hi = clopper_pearson(int(robust.sum()), 300)
    assert lo <= robust.mean() <= hi
