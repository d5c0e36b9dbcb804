"""The pathologies the zoo injects, and the finding kind each one must produce.

One table, the contract between the sampler, the label checks and the scoring:

| pathology | what is done to the run | expected | onset | label check (plain measurement, :mod:`.labels`) |
| --- | --- | --- | --- | --- |
| ``lr_high`` | LR x30-x1000 of the sane LR from step 0 (SGD lr 5, Adam lr 1.0) | exploding | 0 | some loss or gradient non-finite, or the loss peaks 10x / the gradient norm 100x above the sane twin's, or a classifier ends at chance while the twin learns |
| ``lr_jump`` | LR x30-x1000 from a step mid-run (Adam 1e-3 -> 1.0, SGD 0.1 -> 10) | exploding | mid | finite before; after it non-finite, or the loss 10x its level before and above the first loss, or the norm 100x, or the classifier ends at chance |
| ``huge_init`` | weight matrices x10-x50 at init | exploding | 0 | as ``lr_high`` |
| ``exploding_rnn`` | ReLU RNN, recurrent weights orthogonal with gain 3-5 (8 time steps) | exploding | 0 | as ``lr_high`` |
| ``poisoned_batch`` | one batch with inputs x1e4 (models without normalisation, ReLU-like) | exploding | mid | finite before; at the onset the norm 100x the median of the 20 steps before, or non-finite |
| ``nan_input`` | one NaN in the inputs of one batch | nonfinite | mid | every gradient finite before the onset, some non-finite at it |
| ``inf_input`` | one Inf in the inputs of one batch | nonfinite | mid | (same) |
| ``nan_label`` | one NaN target (regression) in one batch | nonfinite | mid | (same) |
| ``zero_math`` | a blank (all-zero) example reaches a hand-written op singular at 0: ``log(sum x^2)``, ``sqrt(sum (Px)^2)``, ``x / ||x||`` | nonfinite | mid | (same) |
| ``tiny_init`` | weight matrices x0.02-x0.1 in a 6-10 layer MLP trained with SGD | vanishing | 0 | median over the run of the first weight's ``||g||`` and ``||g||/||W||`` below 1e-3 of the last weight's |
| ``saturating`` | 6-12 sigmoid layers, default init | vanishing | 0 | (same) |
| ``dying_relu`` | 60-100 % of a ReLU layer's units biased to -8..-20 | dead_units | 0 | at least half of the layer's units output exactly 0 on the whole batch, every step |

A divergence that ends in NaN is still expected as ``exploding`` (the cause); a ``nonfinite``
finding that comes with it is recorded, not required. Onsets marked *mid* are sampled between
15 % and 85 % of the run (``lr_jump``: 25-70 %; at least step 20 where a pre-onset median is
needed). Every pathological run also has a *healthy twin*: the same spec without the pathology
(the sane LR, the default init, no injected batch), trained unwatched, for the label checks that
compare with it and for the rescue criterion.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPLODING, NONFINITE, VANISHING, DEAD_UNITS = "exploding", "nonfinite", "vanishing", "dead_units"

FLOAT_INPUT_FAMILIES = ("mlp", "resmlp", "cnn", "rnn", "logistic", "linear")
"""Families whose inputs are floats (a NaN or x1e4 can be injected in them; not token ids)."""


@dataclass(frozen=True)
class PathologyKind:
    """One row of the table above.

    Attributes:
        name: The pathology's name.
        expected: The finding kind it must produce.
        from_start: Its onset is step 0 (else sampled mid-run).
        families: The model families it can be injected in.
        about: One line: what is done.
    """

    name: str
    expected: str
    from_start: bool
    families: tuple[str, ...]
    about: str


PATHOLOGIES: dict[str, PathologyKind] = {p.name: p for p in (
    PathologyKind("lr_high", EXPLODING, True,
                  ("mlp", "resmlp", "cnn", "rnn", "transformer", "embedding", "logistic", "linear"),
                  "LR x{factor:.0f} of the sane LR from step 0"),
    PathologyKind("lr_jump", EXPLODING, False,
                  ("mlp", "resmlp", "cnn", "rnn", "transformer", "embedding", "logistic", "linear"),
                  "LR x{factor:.0f} from step {onset}"),
    PathologyKind("huge_init", EXPLODING, True,
                  ("mlp", "resmlp", "cnn", "rnn", "transformer", "embedding", "logistic", "linear"),
                  "weight matrices x{factor:.0f} at init"),
    PathologyKind("exploding_rnn", EXPLODING, True, ("rnn",),
                  "recurrent weights orthogonal, gain {factor:.2f}"),
    PathologyKind("poisoned_batch", EXPLODING, False, FLOAT_INPUT_FAMILIES,
                  "inputs x{factor:.0e} in the batch of step {onset}"),
    PathologyKind("nan_input", NONFINITE, False, FLOAT_INPUT_FAMILIES, "one NaN input at step {onset}"),
    PathologyKind("inf_input", NONFINITE, False, FLOAT_INPUT_FAMILIES, "one Inf input at step {onset}"),
    PathologyKind("nan_label", NONFINITE, False, ("mlp", "resmlp", "linear", "embedding"),
                  "one NaN target at step {onset}"),
    PathologyKind("zero_math", NONFINITE, False, ("mlp", "resmlp", "cnn", "logistic"),
                  "a blank example hits the model's {variant} at zero at step {onset}"),
    PathologyKind("tiny_init", VANISHING, True, ("mlp",), "weight matrices x{factor:.3g} at init"),
    PathologyKind("saturating", VANISHING, True, ("mlp",), "a deep {variant} stack, default init"),
    PathologyKind("dying_relu", DEAD_UNITS, True, ("mlp", "resmlp", "cnn"),
                  "{share:.0%} of hidden layer {layer}'s ReLUs biased to -{factor:.0f}"),
)}

EXPECTED_KINDS = (EXPLODING, NONFINITE, VANISHING, DEAD_UNITS)

DIVERGING = frozenset(p.name for p in PATHOLOGIES.values() if p.expected in (EXPLODING, NONFINITE))
"""Pathologies that ``auto`` is meant to rescue (the rescue rate is measured on these)."""

ZERO_MATH_OPS = ("log_energy", "norm_feature", "l2norm")
"""The hand-written input ops with a singular point at the all-zero example: ``log(sum x^2)``
(forward -inf), ``sqrt(sum x^2)`` appended as a feature (finite forward, NaN gradient) and
``x / ||x||`` (0/0 forward)."""

__all__ = ["DEAD_UNITS", "DIVERGING", "EXPECTED_KINDS", "EXPLODING", "FLOAT_INPUT_FAMILIES", "NONFINITE",
           "PATHOLOGIES", "VANISHING", "ZERO_MATH_OPS", "PathologyKind"]
