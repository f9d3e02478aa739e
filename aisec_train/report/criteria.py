"""What each checklist item's "pass" means, and what to do when it fails.

One table, so that the criterion written into report.json, the model card and docs/checklist.md are the same
words, and a stage answering an item cannot forget to state it: ``Report.check`` refuses an item with no
criterion here (or passed in) and a "fail" with no fix. A caller passes ``fix=`` when the fix needs a number of
this run (the data hash to pin, say); otherwise the table's default fix is used.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Criterion:
    criterion: str  # the condition that "pass" certifies, measured in this run
    fix: str  # the override or command that turns a "fail" into a "pass" (or why none exists)


# Order follows docs/checklist.md: data pipeline, training, model, deployment, monitoring.
CRITERIA: dict[str, Criterion] = {
    "data integrity verified against a pinned hash": Criterion(
        "dataset.sha256 is set and equals the SHA-256 of the data manifest measured in this run (a mismatch "
        "refuses the run before training)",
        "pin the manifest hash: aisec-train dataset.sha256=<the manifest SHA-256 in the evidence>",
    ),
    "sanity checks before training (NaN/inf, range, labels, balance, duplicates, outliers)": Criterion(
        "every check ran before the first step (labels over every sample, values over every sample or a seeded "
        "sample of dataset.sanity_samples); blocking findings (NaN/inf, labels out of range) refuse the run, the "
        "rest are listed in the evidence",
        "raise dataset.sanity_samples to the training split's size to check every sample",
    ),
    "data lineage recorded": Criterion(
        "report.json data.lineage lists every step from the source to the training view",
        "report a bug: the lineage is recorded by the data stage",
    ),
    "validation against poisoning (spectral signatures, activation clustering)": Criterion(
        "the detector named by backdoor.detection flags at least 80% of the red team's poisoned training rows "
        "(recall >= 0.8)",
        "try the other detector (backdoor.detection=spectral or activation_clustering) or a smaller "
        "backdoor.detection_k",
    ),
    "training data stays in its silo (federated training)": Criterion(
        "federated training on disjoint client partitions: only model updates left a client",
        "use federated=fedavg (or fedavg_he) so that the data never leaves its client",
    ),
    "differentially private training (DP-SGD)": Criterion(
        "the model was trained with DP (record-level DP-SGD or client-level DP-FedAvg) and its epsilon, by the "
        "configured accountant, is at most privacy.target_epsilon when one is set; the noise and sampling came from "
        "OS entropy (not privacy.reproducible_noise) and privacy.delta < 1/n_train",
        "aisec-train privacy=dpsgd privacy.target_epsilon=<epsilon> (privacy.reproducible_noise=false, "
        "privacy.delta below 1/n_train)",
    ),
    "membership-inference audit": Criterion(
        "with DP: every attack's measured (TPR, FPR) pairs respect TPR <= e^epsilon FPR + delta (Clopper-Pearson, "
        "95% family-wise: Bonferroni over the attacks x the thresholds tested); without DP: the strongest attack's "
        "AUC has its 95% CI upper bound at most audit.membership.max_auc",
        "train with DP (aisec-train privacy=dpsgd) or with fewer epochs / more data; a violated DP bound is a bug "
        "to report",
    ),
    "empirical privacy audit (one-run, Steinke et al. 2023)": Criterion(
        "the empirical epsilon lower bound from the canaries does not exceed the claimed epsilon",
        "do not release this model: the measured leakage refutes the DP claim; report it as a bug",
    ),
    "defence data covered by the privacy claim": Criterion(
        "every record the backdoor defence reads is covered by the DP guarantee (no record outside it)",
        "give the defence its own clean set outside the training data, backdoor.trusted_path=FILE.npz (treated as "
        "public; a reserve carved from the training split is never trained with DP), or state the uncovered records "
        "in the release",
    ),
    "poisoned or corrupt client updates refused (NaN/inf, norm bound)": Criterion(
        "no update from a client injected with a NaN/inf or over-norm fault was accepted in a round the fault fired in",
        "keep the server's check (federated.aggregation=plaintext) or the clients' own check "
        "(federated.inject.skip_client_check=false)",
    ),
    "robust aggregation against malicious clients": Criterion(
        "the server applies a robust rule to plaintext updates and the rule tolerates the malicious clients "
        "configured (the larger of federated.defence.num_malicious and the red team's clients, f, among the "
        "n updates of a round): Krum n >= 2f+3, median and norm bounding 2f < n, trimmed mean f <= "
        "floor(trim_fraction n) and 2f < n",
        "use federated.aggregation=plaintext with federated.defence.name=krum (or median, trimmed_mean) and "
        "enough clients for the attackers (see the criterion)",
    ),
    "tested against evasion attacks": Criterion(
        "the robustness.eval suite ran on the evaluation sample and at least one of its attacks completed; the "
        "robust accuracy is the figure claimed",
        "every attack was skipped (the evidence says why): aisec-train robustness.eval=pgd",
    ),
    "robust accuracy not inflated by gradient masking": Criterion(
        "no sign of gradient masking: black-box Square finds no example the white-box attacks missed, more "
        "steps do not raise robust accuracy, no zero input gradients",
        "train robustly instead of masking gradients (robustness=pgd_at or robustness=trades) and evaluate with "
        "robustness.eval=autoattack",
    ),
    "model-extraction test": Criterion(
        "the guard lowered the surrogate's fidelity in every paired attacker seed (mean drop > 0)",
        "tighten the guard: audit.guard.output=label and a smaller audit.guard.query_budget",
    ),
    "input sanitisation evaluated under an adaptive attack": Criterion(
        "the adaptive (BPDA-PGD) attack is at least as strong as plain PGD, and the sanitiser raises robust "
        "accuracy under it above the undefended model's",
        "do not deploy this sanitiser (keep audit.guard.bit_depth=0 audit.guard.smoothing=0, the default); try "
        "another (audit.extraction.sanitizer_bit_depth, audit.extraction.sanitizer_smoothing) or train robustly "
        "(robustness=pgd_at)",
    ),
    "pruning against poisoning (Fine-Pruning)": Criterion(
        "after the repair the attack success rate is at most 0.05 and clean accuracy fell by at most 0.02",
        "more repair: raise backdoor.finetune_epochs or backdoor.prune_acc_drop, or backdoor.filter=true (non-DP)",
    ),
    "checkpoint hashed and verified before loading": Criterion(
        "model.pt was written atomically with its SHA-256 recorded, and loaders verify that hash and use "
        "weights_only=True",
        "report a bug: model.pt is hashed by the save_model stage",
    ),
    "aggregation server never sees a client update (encrypted aggregation)": Criterion(
        "federated.aggregation=ckks, the server added at least one encrypted update, and the CKKS aggregate is "
        "within 1e-6 of plaintext FedAvg",
        "aisec-train federated=fedavg_he (federated.aggregation=ckks)",
    ),
    "aggregation server holds no key material": Criterion(
        "the server's context is public (is_private() false, cannot decrypt) and the secret context is mode 600 "
        "outside the server's folder",
        "regenerate the keys (delete the run's client_keys/ and federated/server/keys/) and keep the secret "
        "context out of the server's folder",
    ),
    "federated transport encrypted (TLS to the SuperLink)": Criterion(
        "the deployment engine connects to the SuperLink over TLS (not applicable in simulation)",
        "federated.deployment.insecure=false federated.deployment.root_certificates=<CA bundle>",
    ),
    "no single key holder can decrypt individual updates (key custody)": Criterion(
        "no single key holder (one client, or a client colluding with the server) can decrypt an individual "
        "update: needs threshold or multi-key HE, or secure aggregation",
        "none in aisec-train today (single-key CKKS); key rotation (federated.ckks.rotate_every) limits a leaked "
        "key to its epoch; accept the collusion risk in the release notes",
    ),
    "guarded query interface refuses malformed and over-rate queries": Criterion(
        "every malformed query probe is refused, a valid query is answered, a query beyond the burst is refused "
        "and one after the refill is answered",
        "report a bug in aisec_train/audit/guard.py (the probes are fixed); check audit.guard.rate_limit and burst",
    ),
    "checkpoint registered in the model inventory (known-good registry with rollback)": Criterion(
        "model.pt is in the registry with its verified SHA-256, headline metrics and governance",
        "aisec-train-registry register RUN_DIR",
    ),
    "baseline input and confidence statistics saved with the model": Criterion(
        "monitor_baseline.json was written beside model.pt with per-feature and confidence statistics, hashed",
        "report a bug: the baseline is written by the audit stage",
    ),
    "drift check flags shifted batches (noise, rotation, occlusion) and not a clean one": Criterion(
        "the drift monitor raises no alarm on the clean held-out batch and an alarm on every shifted batch",
        "tune audit.monitor.drift_threshold between the clean and the shifted drift scores in the evidence",
    ),
    "client dropouts tolerated with a quorum": Criterion(
        "no round failed: each round had at least federated.min_clients usable updates",
        "lower federated.min_clients or raise federated.round_timeout_s (or find why clients dropped in the "
        "per-round errors)",
    ),
}


def lookup(item: str) -> Criterion | None:
    return CRITERIA.get(item)
