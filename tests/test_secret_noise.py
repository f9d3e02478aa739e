"""Issue 20, items 1 and 4: DP noise and Poisson batches nobody can replay from train.seed, and claims that fail
when they are not a guarantee (reproducible noise, delta >= 1/n, non-Poisson sampling, a changed resume)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import run_cli

import aisec_train
from aisec_train.data.config import DatasetConfig
from aisec_train.data.dataset import load_dataset
from aisec_train.errors import ConfigError
from aisec_train.models import build_model
from aisec_train.privacy.engine import make_private
from aisec_train.privacy.ledger import PrivacyLedger
from aisec_train.privacy.randomness import secret_generator, seeded_generator
from aisec_train.train.config import Accountant, GradSampleMode, PrivacyConfig, PrivacyMode, TrainConfig
from aisec_train.train.loop import train

CPU = torch.device("cpu")
DP_ITEM = "differentially private training (DP-SGD)"
QUICK = ["train.epochs=1", "audit=off", "robustness.evaluate=false"]


@pytest.fixture(scope="module")
def data():
    return load_dataset(DatasetConfig(name="synthetic", n_samples=300), seed=0).train


def fit(data, *, epochs=1, resume=None, saved=None, batch_size=64, **privacy):
    privacy = {"target_epsilon": 5.0, "accountant": Accountant.rdp, **privacy}
    torch.manual_seed(0)  # the initial weights follow the seed, as the model factory does
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, max_physical_batch_size=64, lr=0.5, seed=0)
    return train(model, data, train_cfg=cfg, privacy_cfg=PrivacyConfig(**privacy), device=CPU, resume=resume,
                 persist=saved.append if saved is not None else None, progress=False)  # fmt: skip


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode() + value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _follows_mt_seeding(words: list[int]) -> bool:
    """Whether MT19937 state words were produced by its 32-bit seeding recurrence (a 2**32 search replays it)."""
    return all(words[i] == (1812433253 * (words[i - 1] ^ (words[i - 1] >> 30)) + i) & 0xFFFFFFFF for i in range(1, 624))


def _mt_words(generator: torch.Generator) -> list[int]:
    raw = bytes(generator.get_state()[24 : 24 + 624 * 8].tolist())
    return [int.from_bytes(raw[8 * i : 8 * i + 4], "little") for i in range(624)]


def test_the_secret_generator_fills_the_whole_state_from_os_entropy():
    assert _follows_mt_seeding(_mt_words(torch.Generator().manual_seed(2**40 + 7)))  # manual_seed: 32 bits only
    a, b = secret_generator(), secret_generator()
    assert not _follows_mt_seeding(_mt_words(a)) and _mt_words(a) != _mt_words(b)
    assert not torch.equal(torch.randn(1000, generator=a), torch.randn(1000, generator=b))
    draws = torch.randn(200_000, generator=secret_generator())
    assert abs(float(draws.mean())) < 0.01 and abs(float(draws.std()) - 1) < 0.01  # still a standard normal


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_every_private_step_draws_its_noise_from_the_generator_it_is_given(data, mode):
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, image_size=8)
    loader = torch.utils.data.DataLoader(data, batch_size=64, generator=secret_generator())
    noise = secret_generator()
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, PrivacyConfig(grad_sample_mode=mode),
                      ledger=PrivacyLedger("rdp", 1e-5), epochs=1, noise_generator=noise)  # fmt: skip
    assert dp.optimizer.generator is noise and dp.optimizer.secure_mode  # Opacus' four-draw sum, our generator
    assert dp.loader.batch_sampler.generator is loader.generator  # the Poisson coins: the loader's secret one


def test_two_identical_dp_trainings_differ_and_non_dp_ones_do_not(data):
    assert digest(fit(data).model) != digest(fit(data).model)
    plain = {"mode": PrivacyMode.none}
    assert digest(fit(data, **plain).model) == digest(fit(data, **plain).model)  # the seed still governs the rest
    replay = {"reproducible_noise": True}  # the debug override: replayable, so NO DP guarantee (see below)
    assert digest(fit(data, **replay).model) == digest(fit(data, **replay).model)


def test_a_resume_keeps_its_mechanism(data):
    saved: list = []
    first = fit(data, saved=saved, noise_multiplier=2.0)
    assert saved[-1]["ledger"]["max_grad_norm"] == 0.5 and saved[-1]["ledger"]["reproducible_noise"] is False
    again = fit(data, epochs=2, resume=saved[-1], noise_multiplier=2.0)  # the same mechanism resumes
    assert again.ledger.steps == 2 * first.ledger.steps and [r["epoch"] for r in again.history] == [1, 2]
    for change, key in [
        ({"noise_multiplier": 3.0}, "privacy.noise_multiplier=3.0"),
        ({"noise_multiplier": 2.0, "max_grad_norm": 1.0}, "privacy.max_grad_norm=1.0"),
        ({"noise_multiplier": 2.0, "batch_size": 32}, "sample rate"),
        ({"noise_multiplier": 2.0, "reproducible_noise": True}, "privacy.reproducible_noise=True"),
    ]:
        with pytest.raises(ConfigError, match=key):
            fit(data, epochs=2, resume=saved[-1], **change)


def test_non_poisson_sampling_under_dp_is_refused():
    with pytest.raises(ConfigError, match="privacy.poisson_sampling=False is not allowed"):
        PrivacyConfig(poisson_sampling=False)
    PrivacyConfig(mode=PrivacyMode.none, poisson_sampling=False)  # without DP there is no claim to protect


def test_seeded_generators_replay():
    assert torch.equal(torch.rand(5, generator=seeded_generator(3)), torch.rand(5, generator=seeded_generator(3)))


# ---- the real pipeline: the API and the command line ---------------------------------------------------------
def dp_item(report) -> dict:
    return next(c for c in report.checklist if c["item"] == DP_ITEM)


def test_two_identical_api_runs_release_different_models_and_say_where_the_randomness_came_from(tmp_path, monkeypatch):
    a = aisec_train.run(QUICK, run_dir=tmp_path / "a")
    monkeypatch.setenv("AISEC_TRAIN_LEDGER_STORE", str(tmp_path / "other_store"))  # as another team would
    b = aisec_train.run(QUICK, run_dir=tmp_path / "b")  # the same seed, data and config
    assert a.get("model.sha256") != b.get("model.sha256")
    randomness = a.get("privacy.randomness")
    assert randomness["noise"] == randomness["sampling"] == "os_entropy" and randomness["dp_guarantee"] is True
    assert "train.seed=0" in randomness["public"] and a.get("privacy.guarantee") == {"holds": True, "gaps": []}
    assert dp_item(a)["status"] == "pass"


def test_reproducible_noise_claims_no_guarantee(tmp_path):
    report = aisec_train.run([*QUICK, "privacy.reproducible_noise=true"], run_dir=tmp_path / "r")
    assert report.get("privacy.randomness.dp_guarantee") is False
    item = dp_item(report)
    assert item["status"] == "fail" and "NO DP guarantee" in item["evidence"]
    assert "privacy.reproducible_noise=true" in item["evidence"]
    assert "**NO DP guarantee holds**" in (tmp_path / "r" / "model_card.md").read_text()
    assert "NO DP guarantee" in (tmp_path / "r" / "security_report.md").read_text()


def test_a_delta_at_or_above_one_over_n_fails_whatever_the_reason(tmp_path):
    overrides = [*QUICK, "privacy.delta=0.01", "privacy.delta_reason=we accept it"]
    report = aisec_train.run(overrides, run_dir=tmp_path / "d")
    item = dp_item(report)
    assert item["status"] == "fail" and "1/n_train" in item["evidence"] and "we accept it" in item["evidence"]
    assert report.get("privacy.guarantee.holds") is False


def test_the_cli_refuses_non_poisson_dp_in_one_line(tmp_path):
    proc = run_cli(*QUICK, "privacy.poisson_sampling=false", f"hydra.run.dir={tmp_path / 'p'}", timeout=120)
    assert proc.returncode == 2 and "privacy.poisson_sampling=False is not allowed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "p" / "checkpoints").exists()  # before any work


@pytest.mark.slow  # a run, then the CLI's refusal (~50 s on a loaded 2-core machine); the loop-level twin is fast
def test_the_cli_refuses_a_resume_with_another_noise_multiplier_in_one_line(tmp_path):
    run_dir = tmp_path / "n"
    aisec_train.run([*QUICK, "privacy.noise_multiplier=2.0"], run_dir=run_dir)
    proc = run_cli("train.epochs=2", "audit=off", "robustness.evaluate=false", "privacy.noise_multiplier=3.0",
                   f"hydra.run.dir={run_dir}", timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "privacy.noise_multiplier=3.0 is not allowed" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
