"""``gradwatch doctor``: repairs that are tried before they are recommended.

The doctor starts where a gradient check ends. From the findings of a short baseline run and the
model's own structure and numbers it names the **causes** (saturating activations, an init scale
that does not fit the activation, no normalisation in a deep stack, plain SGD across gradients
that span decades, an LR whose first updates are a large share of the weights, a norm that needs
clipping, dead ReLUs); it generates the **candidate repairs** those causes call for, applies each
to a copy of the model, trains every copy for the same short budget on the same batches and seed
watched by gradwatch, and **ranks** them by health and the loss reached.

This package is the framework-free part: the description of a model
(:mod:`~gradwatch.doctor.model`), the causes (:mod:`~gradwatch.doctor.causes`), the candidates
(:mod:`~gradwatch.doctor.repairs`), the trials' early stopping and ranking
(:mod:`~gradwatch.doctor.trials`), the sequence (:mod:`~gradwatch.doctor.run`) and the result
(:mod:`~gradwatch.doctor.result`, :mod:`~gradwatch.doctor.html`). Describing, rewriting and
training a model are the adapters' (``gradwatch.integrations.torch.doctor``,
``gradwatch.integrations.keras.doctor``), imported when a setup of theirs comes in.

>>> from gradwatch.doctor import run_doctor                       # doctest: +SKIP
>>> result = run_doctor(build_deep_sigmoid_mlp, steps=60)          # doctest: +SKIP
>>> result.best.name, result.repaired_model                       # doctest: +SKIP
('sigmoid->relu', Sequential(...))
"""

from __future__ import annotations

from gradwatch.doctor.causes import CAUSE_KINDS, Cause, diagnose, symptoms_of
from gradwatch.doctor.model import LayerInfo, ModelDescription, activation_stats, expected_std
from gradwatch.doctor.repairs import (
    Candidate,
    Change,
    ClipNorm,
    InsertNorm,
    Reinit,
    ScaleLR,
    SwapActivation,
    SwitchOptimizer,
    combine,
    propose,
)
from gradwatch.doctor.result import DoctorResult
from gradwatch.doctor.run import (
    DEFAULT_DOCTOR_STEPS,
    DoctorAdapter,
    TrialProgress,
    doctor_target,
    run_doctor,
)
from gradwatch.doctor.trials import EarlyStop, TrialResult, rank

__all__ = [
    "CAUSE_KINDS",
    "DEFAULT_DOCTOR_STEPS",
    "Candidate",
    "Cause",
    "Change",
    "ClipNorm",
    "DoctorAdapter",
    "DoctorResult",
    "EarlyStop",
    "InsertNorm",
    "LayerInfo",
    "ModelDescription",
    "Reinit",
    "ScaleLR",
    "SwapActivation",
    "SwitchOptimizer",
    "TrialProgress",
    "TrialResult",
    "activation_stats",
    "combine",
    "diagnose",
    "doctor_target",
    "expected_std",
    "propose",
    "rank",
    "run_doctor",
    "symptoms_of",
]
