"""Images off the [0, 1] pixel scale are refused in the data stage when anything will attack them, before training
and the privacy budget's charge: the attacks clamp to [0, 1], so on [0, 16] data the evasion item passed with robust
accuracy equal to clean accuracy (robust/outcome.check_inputs refuses it there too, after training)."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from aisec_train.cli import CONFIG_DIR
from aisec_train.config import register_configs, to_config
from aisec_train.data.errors import DataError
from aisec_train.data.stage import check_attack_scale
from tests.fuzzing import BASE, call_cli, npz_bytes


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=["experiment=smoke", *overrides]))


@pytest.mark.parametrize("overrides", [[], ["robustness=pgd_at", "robustness.evaluate=false"]])
def test_an_attacked_run_refuses_images_off_the_pixel_scale(overrides):
    with pytest.raises(DataError, match=r"span \[0, 16\].*\[0, 1\] pixel scale"):
        check_attack_scale(_cfg(*overrides), [0.0, 16.0])
    with pytest.raises(DataError, match=r"span \[-1, 1\]"):
        check_attack_scale(_cfg(*overrides), [-1.0, 1.0])
    check_attack_scale(_cfg(*overrides), [0.0, 1.0 + 1e-7])  # float rounding of x / 255 stays allowed


def test_a_run_nothing_attacks_keeps_the_range_as_a_finding():
    check_attack_scale(_cfg("robustness.evaluate=false"), [0.0, 16.0])


def test_the_cli_refuses_before_training(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "x16.npz"
    data.write_bytes(npz_bytes({"x": rng.random((60, 8, 8), dtype=np.float32) * 16, "y": np.arange(60) % 3}))
    run_dir = tmp_path / "run"
    code, err, crash = call_cli([*BASE, "privacy=none", "dataset=npz", f"dataset.path={data}",
                                 "robustness.evaluate=true", f"hydra.run.dir={run_dir}"])  # fmt: skip
    assert code == 2 and not crash, (code, err, crash)
    assert "robustness evaluation and adversarial training attack images on the [0, 1] pixel scale" in err, err
    assert not (run_dir / "model.pt").exists() and not (run_dir / "checkpoints").exists()


def test_an_l2_radius_past_half_the_box_is_refused_before_training():
    from aisec_train.data.stage import check_l2_radius
    from aisec_train.errors import ConfigError

    # digits: 64 values, sqrt(64) / 2 = 4
    with pytest.raises(ConfigError, match=r"robustness.attack.eps=4.0 is not allowed: an l2 radius .* must be < 4"):
        check_l2_radius(_cfg("robustness.attack.norm=l2", "robustness.attack.eps=4.0"), (1, 8, 8))
    with pytest.raises(ConfigError, match=r"robustness.eps=9.0 is not allowed"):
        check_l2_radius(
            _cfg(
                "robustness=pgd_at",
                "robustness.norm=l2",
                "robustness.eps=9.0",
                "robustness.evaluate=false",
                "robustness.attack.norm=l2",
            ),
            (1, 8, 8),
        )
    check_l2_radius(_cfg("robustness.attack.norm=l2", "robustness.attack.eps=3.9"), (1, 8, 8))
    check_l2_radius(_cfg("robustness.attack.norm=l2", "robustness.attack.eps=4.0"), (3, 8, 8))  # sqrt(192) / 2
    check_l2_radius(
        _cfg("robustness.evaluate=false", "robustness.attack.norm=l2", "robustness.attack.eps=99"), (1, 8, 8)
    )
