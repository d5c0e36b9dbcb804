"""Reports: what a run's gradients looked like, what was wrong, and what was done.

:class:`Report` (:mod:`gradwatch.report.base`) is plain data with its text, dict and JSON forms;
the other renderings live one per module and are imported when used: JUnit XML
(:mod:`gradwatch.report.junit`), HTML (:mod:`gradwatch.report.html`) and matplotlib figures
(:mod:`gradwatch.report.figures`, which needs ``pip install 'gradwatch[report]'``).
"""

from __future__ import annotations

from gradwatch.report.base import FAIL_ON, SCHEMA_VERSION, Report, check_fail_on

__all__ = ["FAIL_ON", "SCHEMA_VERSION", "Report", "check_fail_on"]
