"""The shared options: the same checks and the same rollback rule for every adapter."""

from __future__ import annotations

import logging

import pytest

from gradwatch.options import (
    ROLLBACK_BUDGET_BYTES,
    ROLLBACK_EVERY,
    check_rollback_every,
    resolve_rollback_every,
)
from gradwatch.policy import AutoPolicy, ObservePolicy


@pytest.mark.parametrize("bad", [0, -3, 2.5, "sometimes", True])
def test_rollback_every_refuses_what_it_cannot_mean(bad):
    with pytest.raises(ValueError, match="rollback_every must be 'auto', None"):
        check_rollback_every(bad)


def test_auto_snapshots_only_under_a_policy_that_rolls_back_and_within_the_budget(caplog):
    assert resolve_rollback_every("auto", AutoPolicy(), 10_000) == ROLLBACK_EVERY
    assert resolve_rollback_every("auto", ObservePolicy(), 10_000) is None
    assert resolve_rollback_every("auto", AutoPolicy(rollback=False), 10_000) is None
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        too_big = ROLLBACK_BUDGET_BYTES // 3 + 1
        assert resolve_rollback_every("auto", AutoPolicy(), too_big) is None
    assert "keeps no rollback snapshot" in caplog.text and f"rollback_every={ROLLBACK_EVERY}" in caplog.text
    # What the user asks for explicitly is kept whatever the size.
    assert resolve_rollback_every(7, AutoPolicy(), 10 * ROLLBACK_BUDGET_BYTES) == 7
    assert resolve_rollback_every(None, AutoPolicy(), 10) is None
