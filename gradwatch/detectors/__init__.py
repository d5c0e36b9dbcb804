"""Built-in detectors. Each is a factory returning a :class:`Detector` ``(kind, init, update)``.

>>> from gradwatch import detectors
>>> [d.kind for d in detectors.default_detectors()]
['nonfinite', 'exploding', 'vanishing', 'dead_units', 'loss_spike']
"""

from __future__ import annotations

from gradwatch.detectors.base import Detector, state_from_dict, state_to_dict
from gradwatch.detectors.dead_units import dead_units
from gradwatch.detectors.exploding import exploding
from gradwatch.detectors.loss_spike import loss_spike
from gradwatch.detectors.nonfinite import nonfinite
from gradwatch.detectors.vanishing import vanishing

__all__ = [
    "Detector",
    "dead_units",
    "default_detectors",
    "exploding",
    "loss_spike",
    "nonfinite",
    "state_from_dict",
    "state_to_dict",
    "vanishing",
]


def default_detectors() -> list[Detector]:
    """The five built-in detectors with their default settings."""
    return [nonfinite(), exploding(), vanishing(), dead_units(), loss_spike()]
