"""The PyTorch backend's measurement, in plain torch: each eager Keras op costs ~10 us of dispatch,
so the ~30 small ops of a step's statistics are written against torch directly (and the norms use
the fused ``torch._foreach_norm``). Same row as :meth:`StepProbe._measure`."""

from __future__ import annotations

import math
from typing import Any


def measure_torch(probe: Any, grads: list[Any], by_index: dict[int, Any]) -> dict[str, Any]:
    """Measure one step and write its row, on the PyTorch backend.

    Args:
        probe: The :class:`~gradwatch.integrations.keras.step.StepProbe`.
        grads: The gradients as Keras passed them (None for a variable without one).
        by_index: The gradients that exist, by their variable's index in the optimizer.

    Returns:
        The plan for :meth:`StepProbe._steer`: gradients, skip and clip flags, clip scale, rate.
    """
    import torch

    with torch.no_grad():
        present = sorted(by_index)
        norms = probe._norms([by_index[i] for i in present])
        params = torch.stack(probe._norms([v.value for v in probe.variables]))
        device = params.device
        key = tuple(present)
        cached = getattr(probe, "_torch_cache", None)
        if cached is None or cached[0] != key:
            index = torch.tensor(present, dtype=torch.long, device=device)
            biases = [i for i in present if probe.layout.roles[i] == "bias"]
            has = torch.zeros(probe.n, device=device)
            has[index] = 1.0
            sizes = torch.tensor([float(by_index[i].numel()) for i in biases], device=device)
            cached = (key, index, biases, torch.tensor(biases, dtype=torch.long, device=device), has, sizes)
            probe._torch_cache = cached
        _, index, biases, bias_index, has, sizes = cached
        grad_vec = torch.zeros(probe.n, device=device)
        if norms:
            grad_vec[index] = torch.stack(norms)
        zero_fraction = torch.full((probe.n,), math.nan, device=device)
        if biases:
            # The share of exactly-zero bias gradients, from one L0 "norm" (the count of non-zeros)
            # of all of them: the same float32 number as (g == 0).float().mean(), in one op.
            nonzero = torch.stack(torch._foreach_norm([by_index[i] for i in biases], 0, dtype=torch.float32))
            zero_fraction[bias_index] = (sizes - nonzero) / sizes
        finite = torch.isfinite(grad_vec).all()
        global_norm = torch.linalg.vector_norm(grad_vec)
        dead_fraction = _unit_streaks(probe, by_index, biases, global_norm, device)
        controls = probe.controls_var.value
        rate = probe.target._get_current_learning_rate()
        rate = rate.value if hasattr(rate, "value") else torch.as_tensor(rate, device=device)
        if probe.remedies:
            skip = (controls[0] > 0.5) & ~finite
            do_clip = finite & ~skip & (global_norm > controls[1])
            scale = torch.where(do_clip, controls[1] / global_norm.clamp_min(1e-30), torch.ones((), device=device))
            rate = rate * controls[2].to(rate.dtype)
            factor = controls[2].float()
        else:
            skip = do_clip = torch.zeros((), dtype=torch.bool, device=device)
            scale = torch.ones((), device=device)
            factor = torch.ones((), device=device)
        count = probe.count_var.value
        loss = probe.tap.loss() if probe.tap is not None else None
        if loss is None:
            loss_entries = [torch.full((), math.nan, device=device), torch.zeros((), device=device)]
        else:
            loss_entries = [loss.to(device=device, dtype=torch.float32).reshape(()), torch.ones((), device=device)]
        target = probe.tap.target() if probe.tap is not None else None
        if target is None:
            target_entries = [torch.full((), math.nan, device=device), torch.zeros((), device=device)]
        else:
            target_entries = [t.to(device=device, dtype=torch.float32).reshape(()) for t in target]
        head = torch.stack([count.float(), global_norm, rate.float(), skip.float(), scale, *loss_entries,
                            factor.reshape(()), *target_entries])
        row = torch.cat([head, grad_vec, params, zero_fraction, has, dead_fraction])
        with probe.lock:
            probe.ring_var.value.index_copy_(0, (count % probe.ring).long().view(1), row.view(1, -1))
            count.add_(1)
    return {"grads": grads, "skip": skip, "scale": scale, "rate": rate, "do_clip": do_clip}


def _unit_streaks(probe: Any, by_index: dict[int, Any], biases: list[int], global_norm: Any, device: Any) -> Any:
    """Each followed unit's zero-gradient streak, updated in place (not on a step whose whole
    gradient is zero or non-finite), and per tensor the share of its units at ``UNIT_STREAK`` or
    more (NaN where not followed): :meth:`StepProbe._unit_streaks` for the PyTorch backend."""
    import torch

    from gradwatch.stats import UNIT_STREAK

    dead = torch.full((probe.n,), math.nan, device=device)
    spans = [(i, *probe.unit_spans[i]) for i in biases if i in probe.unit_spans
             and by_index[i].numel() == probe.unit_spans[i][1]]
    if not spans:
        return dead
    streak = probe.streak_var.value
    for i, offset, size in spans:
        before = streak[offset:offset + size]
        zero = (by_index[i].reshape(-1) == 0).to(before.dtype)
        after = torch.where(global_norm > 0, (before + 1.0) * zero, before)
        before.copy_(after)
        dead[i] = (after >= UNIT_STREAK).float().mean()
    return dead
