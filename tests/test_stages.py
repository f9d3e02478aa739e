"""Each pipeline stage lives in the package that owns its concept; ``pipeline.py`` only lists and runs them."""

from __future__ import annotations

from aisec_train import pipeline


def test_every_stage_is_its_packages_stage_module_and_the_pipeline_defines_none():
    homes = {name: stage.__module__ for name, stage in pipeline.STAGES}
    assert homes == {
        "data": "aisec_train.data.stage",
        "backdoor_poison": "aisec_train.backdoor.stage",
        "train": "aisec_train.train.stage",
        "backdoor_defend": "aisec_train.backdoor.stage",
        "evaluate": "aisec_train.robust.stage",
        "robustness": "aisec_train.robust.stage",
        "audit": "aisec_train.audit.stage",
        "save_model": "aisec_train.report.stage",
        "register": "aisec_train.audit.stage",
    }
    own = pipeline.__name__
    defined = [name for name, value in vars(pipeline).items() if getattr(value, "__module__", None) == own]
    assert sorted(defined) == ["preflight", "run_pipeline"]  # the checks before the first stage, and the runner
