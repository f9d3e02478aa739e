"""The repair's fine-tuning pieces (backdoor/retune.py) and the boosted malicious client (model replacement)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from aisec_train.backdoor import federated_poison, retune
from aisec_train.backdoor.config import BackdoorConfig
from aisec_train.cli import CONFIG_DIR
from aisec_train.components import build
from aisec_train.config import register_configs, to_config
from aisec_train.models import ModelFactory
from tests.conftest import run_cli


def _model():
    return ModelFactory({"_target_": "aisec_train.models.SmallCNN"}, (1, 8, 8), 10)(seed=0)


def test_the_head_is_every_module_after_the_feature_layer_and_only_it_is_reinitialised():
    model, probe = _model(), torch.rand(4, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    head = retune.reinit_head(model, "features_out", probe, seed=3)
    assert head == ["squeeze", "fc1", "fc2"]
    assert torch.equal(state, torch.random.get_rng_state())  # seeded on a forked generator
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    again = _model()
    retune.reinit_head(again, "features_out", probe, seed=3)
    assert torch.equal(again.fc2.weight, model.fc2.weight)  # deterministic in the seed


def test_scaled_sgd_gives_the_body_its_fraction_of_the_lr_and_the_tags_go_away():
    model, probe = _model(), torch.rand(2, 1, 8, 8)
    head = retune.head_modules(model, "features_out", probe)
    with retune.lr_scales(model, head, body=0.2):
        opt = build({"_target_": retune.OPTIMIZER, "lr": 0.1, "weight_decay": 0.02}, "optimizer",
                    params=model.parameters())  # fmt: skip
    lrs = sorted((g["lr"], len(g["params"])) for g in opt.param_groups)
    assert lrs == [(pytest.approx(0.02), 8), (pytest.approx(0.1), 4)]  # conv1, norm1, conv2, norm2 vs fc1, fc2
    assert not any(hasattr(p, retune.LR_SCALE) for p in model.parameters())
    sched = retune.WarmupCosine(opt, total_steps=100, pct_start=0.1)
    seen = []
    for _ in range(100):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    seen = np.array(seen)
    assert np.allclose(seen[:, 0] / seen[:, 1], 0.2)  # the ratio survives the schedule (OneCycleLR would not)
    assert seen[0, 1] == pytest.approx(0.01) and seen[9, 1] == pytest.approx(0.1) and seen[-1, 1] < 1e-3


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=["experiment=backdoor", *overrides]))


def test_a_boosted_malicious_client_scales_its_update_and_honest_ones_do_not():
    cfg = _cfg("federated=fedavg", "privacy=none", "backdoor.malicious_clients=1", "backdoor.boost=auto",
               "federated.clients=5")  # fmt: skip
    assert federated_poison.boost_factor(cfg) == 5.0  # n / eta with plain FedAvg's eta = 1
    delta = np.ones(3)
    assert np.array_equal(federated_poison.boost(delta, 0, cfg), 5 * delta)
    assert federated_poison.boost(delta, 1, cfg) is delta
    fixed = _cfg("federated=fedavg", "privacy=none", "backdoor.malicious_clients=2", "backdoor.boost=12.5")
    assert federated_poison.boost_factor(fixed) == 12.5 and federated_poison.boost(delta, 1, fixed)[0] == 12.5
    default = _cfg("federated=fedavg", "privacy=none", "backdoor.malicious_clients=1")
    assert federated_poison.boost(delta, 0, default) is delta  # default 1: the unboosted client
    with pytest.raises(Exception, match="backdoor.boost"):
        BackdoorConfig(boost="big")


def test_a_bad_boost_is_refused_in_one_line(tmp_path):
    proc = run_cli("experiment=backdoor", "backdoor.boost=0.5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "backdoor.boost=" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "report.json").exists()
