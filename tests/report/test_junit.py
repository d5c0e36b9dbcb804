from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from gradwatch import FINDING_KINDS, Finding, Report


def cases(xml: str) -> dict[str, ET.Element]:
    root = ET.fromstring(xml.encode("utf-8"))
    assert root.tag == "testsuites"
    return {str(case.get("name")): case for case in root.iter("testcase")}


def test_healthy_run_passes_one_case_per_kind(make_report):
    xml = make_report("healthy", steps=80).to_junit(name="models.py:build_mlp")
    found = cases(xml)
    assert list(found) == list(FINDING_KINDS)
    assert all(case.find("failure") is None for case in found.values())
    root = ET.fromstring(xml.encode())
    assert root.get("failures") == "0" and root.get("tests") == str(len(FINDING_KINDS))
    assert {case.get("classname") for case in found.values()} == {"gradwatch.models_py_build_mlp"}


def test_nan_fails_the_nonfinite_case_with_layers_and_advice(make_report):
    xml = make_report("nan", step=20, steps=40).to_junit(name="t")
    found = cases(xml)
    failure = found["nonfinite"].find("failure")
    assert failure is not None and failure.get("type") == "error"
    assert "fc2" in failure.text and "What to do" in failure.text
    assert all(found[k].find("failure") is None for k in FINDING_KINDS if k != "nonfinite")
    props = {p.get("name"): p.get("value") for p in ET.fromstring(xml.encode()).iter("property")}
    assert props["gradwatch.healthy"] == "false" and props["gradwatch.steps_measured"] == "40"


def test_fail_on_decides_which_cases_fail(make_report):
    report = make_report("exploding", onset=30, steps=60)
    warning_kinds = {k for k, c in cases(report.to_junit()).items() if c.find("failure") is not None}
    assert "exploding" in warning_kinds
    assert all(c.find("failure") is None for c in cases(report.to_junit(fail_on="never")).values())
    error_only = {k for k, c in cases(report.to_junit(fail_on="error")).items() if c.find("failure") is not None}
    assert error_only <= warning_kinds
    with pytest.raises(ValueError, match="fail_on must be one of"):
        report.to_junit(fail_on="fatal")


def test_info_findings_pass_with_their_text():
    report = Report(healthy=True, findings=[Finding("loss_spike", "info", 3, message="a small bump")],
                    finding_counts={"loss_spike": {"info": 1}})
    case = cases(report.to_junit())["loss_spike"]
    assert case.find("failure") is None and "a small bump" in case.find("system-out").text
    assert cases(report.to_junit(fail_on="info"))["loss_spike"].find("failure") is not None


def test_plugin_kinds_get_their_own_case():
    report = Report(healthy=False, findings=[Finding("attention_collapse", "warning", 7, message="heads agree")],
                    finding_counts={"attention_collapse": {"warning": 1}})
    failure = cases(report.to_junit())["attention_collapse"].find("failure")
    assert failure is not None and "plugin" in failure.text


def test_odd_layer_names_give_well_formed_xml(odd_report):
    xml = odd_report.to_junit(name='a<b>&"c"')
    root = ET.fromstring(xml.encode("utf-8"))  # raises on bad escaping or control characters
    text = ET.tostring(root, encoding="unicode")
    assert "\x01" not in xml and 'alert("x")' in ET.fromstring(xml.encode()).find(".//system-out").text
    assert "<script>" not in text.replace("&lt;script&gt;", "")
