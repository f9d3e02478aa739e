"""The security report: a checklist answered with evidence for every area, and a standalone security_report.md."""

from __future__ import annotations

import re

from aisec_train.report.report import AREAS, Report
from aisec_train.report.security_report import security_report, threat_model
from tests.conftest import dig, read_report

CONTRACT = ["audit.membership.auc", "audit.membership.tpr_at_fpr_0_001", "audit.extraction.fidelity"]
CONTRACT += ["audit.extraction.queries"]


def test_checklist_has_evidence_for_every_area(smoke_run):
    report = read_report(smoke_run)
    for key in CONTRACT:
        assert isinstance(dig(report, key), (int, float)), key
    checklist = report["checklist"]
    assert {c["area"] for c in checklist} == set(AREAS)
    for c in checklist:
        assert c["status"] in ("pass", "fail", "not_applicable") and len(c["evidence"]) > 20, c
    by_item = {c["item"]: c for c in checklist}
    # audit answers quote the numbers they were decided on
    assert f"{report['audit']['membership']['auc']:.3f}" in by_item["membership-inference audit"]["evidence"]
    assert f"{report['audit']['extraction']['fidelity']:.3f}" in by_item["model-extraction test"]["evidence"]
    assert any(c["area"] == "monitoring" and "rotation" in c["evidence"] for c in checklist)


def test_security_report_reads_standalone(smoke_run):
    report = read_report(smoke_run)
    md = (smoke_run / "security_report.md").read_text()
    assert report["model"]["target"] == "aisec_train.models.SmallCNN"  # model=cnn, the default preset
    assert md.startswith("# Security report: SmallCNN on digits")
    assert "| stage | threat | impact | mitigation | status for this run |" in md
    for threat in ("membership inference", "model extraction", "data drift / out-of-distribution inputs"):
        assert f"| {threat} |" in md
    for c in report["checklist"]:  # every answer is in the document, word for word
        assert f"**{c['status']}** {c['item']}: {c['evidence']}" in md
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert "membership_roc.png" in images and all((smoke_run / name).stat().st_size > 1000 for name in images)
    # the numbers a reviewer needs, without opening report.json
    assert report["model"]["sha256"] in md and "sha256sum model.pt" in md
    for section in ("## At a glance", "### Membership inference", "### Model extraction", "### Monitoring"):
        assert section in md
    assert "None" not in md and "{" not in md  # no unformatted values leaked in
    card = (smoke_run / "model_card.md").read_text()
    assert "## Threat model" in card and "membership-inference audit" in card


def test_untested_threats_say_so_instead_of_claiming_a_mitigation():
    report = Report()
    report.add("model", name="cnn")
    report.add("data", name="digits")
    rows = {r["threat"]: r["status"] for r in threat_model(report)}
    assert rows["membership inference"] == "not measured (audit.enabled=false)"
    assert rows["model extraction"] == "not measured (audit.enabled=false)"
    assert rows["data drift / out-of-distribution inputs"] == "not measured"
    md = security_report(report, figures=[])
    assert md.count("Not run (audit.enabled=false).") == 3 and "No monitoring baseline" in md
