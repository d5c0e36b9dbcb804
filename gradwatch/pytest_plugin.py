"""pytest plugin of gradwatch, registered under the ``pytest11`` entry point.

Importing it imports no framework.
"""

from __future__ import annotations


def pytest_configure(config):  # type: ignore[no-untyped-def]
    config.addinivalue_line(
        "markers", "gradwatch(steps=30, fail_on='warning'): check the training setup this test returns"
    )
