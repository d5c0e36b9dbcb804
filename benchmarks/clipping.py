"""The adaptive clipping rules gradwatch's remedies are compared with, written from the papers.

Both act where ``clip_grad_norm_`` does: after ``backward()``, before ``optimizer.step()``, on the
global L2 norm of the gradients.

References:
    Seetharaman, Wichern, Pardo, Le Roux. AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks. IEEE MLSP 2020. (Clip at the p-th percentile of every gradient norm seen
    so far; p = 10 in the paper.)
    Kumar, Owen, Roy Chowdhury, Güra. ZClip: Adaptive Spike Mitigation for LLM Pre-Training.
    arXiv:2504.02507, 2025. (EMA mean and variance of the norm; a norm whose z-score exceeds
    ``z_thresh`` = 2.5 is clipped to ``mean + z_thresh**2 / z * std`` (reciprocal clipping); the EMA,
    ``alpha`` = 0.97, is updated with the clipped norm; statistics initialised over a warm-up.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch


def global_norm(params: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all gradients together (inf/NaN if any is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def clip_to(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` at ``max_norm`` (a non-finite norm makes every grad NaN,
    exactly as it does for users)."""
    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)


class AutoClip:
    """Clip at the ``percentile``-th percentile of the history of gradient norms.

    The current norm joins the history before the percentile is taken, as in the paper. Non-finite
    norms are not added (a single NaN would make every later threshold NaN; the paper does not say,
    and leaving them out is the kinder reading).

    Args:
        percentile: The percentile, 0-100. Defaults to 10 (the paper's choice).
    """

    def __init__(self, percentile: float = 10.0) -> None:
        self.percentile = percentile
        self.history: list[float] = []

    def __call__(self, params: list[torch.Tensor]) -> None:
        norm = global_norm(params)
        if math.isfinite(norm):
            self.history.append(norm)
        if self.history:
            clip_to(params, float(np.percentile(self.history, self.percentile)))


class ZClip:
    """Z-score clipping on an EMA of the gradient norm, reciprocal mode.

    Args:
        alpha: EMA decay (weight of the old value). Defaults to 0.97.
        z_thresh: z-score above which a norm is clipped. Defaults to 2.5.
        warmup: Steps whose norms initialise the mean and variance (no clipping). Defaults to 25.
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25) -> None:
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup = warmup
        self.seen: list[float] = []
        self.mean = math.nan
        self.var = math.nan

    def __call__(self, params: list[torch.Tensor]) -> None:
        norm = global_norm(params)
        if len(self.seen) < self.warmup:
            if math.isfinite(norm):
                self.seen.append(norm)
                if len(self.seen) == self.warmup:
                    self.mean, self.var = float(np.mean(self.seen)), float(np.var(self.seen))
            return
        std = math.sqrt(max(self.var, 1e-24))
        z = (norm - self.mean) / std
        clipped = norm
        if z > self.z_thresh:
            clipped = self.mean + self.z_thresh**2 / z * std
            clip_to(params, clipped)
        if math.isfinite(clipped):
            self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
            self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2


__all__ = ["AutoClip", "ZClip", "clip_to", "global_norm"]
