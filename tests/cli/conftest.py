from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gradwatch.cli import main

FACTORIES = Path(__file__).with_name("factories.py")


def target(name: str) -> str:
    return f"{FACTORIES}:{name}"


class CheckRun:
    """One in-process ``gradwatch check`` with every output written to a temporary directory."""

    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp_path = tmp_path
        self.capsys = capsys

    def __call__(self, factory: str, *extra: str, outputs: bool = True) -> CheckRun:
        self.json_path = self.tmp_path / f"{factory}.json"
        self.junit_path = self.tmp_path / f"{factory}.xml"
        args = ["check", target(factory), *extra]
        if outputs:
            args += ["--json", str(self.json_path), "--junit", str(self.junit_path)]
        self.code = main(args)
        captured = self.capsys.readouterr()
        self.out, self.err = captured.out, captured.err
        return self

    @property
    def data(self) -> dict:
        return json.loads(self.json_path.read_text())

    def kinds(self, min_severity: str = "warning") -> set[str]:
        order = ["info", "warning", "error"]
        return {f["kind"] for f in self.data["findings"] if order.index(f["severity"]) >= order.index(min_severity)}

    def failed_cases(self) -> set[str]:
        root = ET.parse(self.junit_path).getroot()
        return {str(case.get("name")) for case in root.iter("testcase") if case.find("failure") is not None}


@pytest.fixture
def check(tmp_path, capsys) -> CheckRun:
    return CheckRun(tmp_path, capsys)
