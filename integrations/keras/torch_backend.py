"""The PyTorch backend's measurement, in plain torch: each eager Keras op costs ~10 us of dispatch,
so the ~30 small ops of a step's statistics are written against torch directly (and the norms use
the fused ``torch._foreach_norm``). Same row as :meth:`StepProbe._measure`."""

from __future__ import annotations

import math
from typing import Any

from gradwatch.stats import UNIT_STREAK


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
            cached = (key, *_units_plan(probe, present, by_index, device))
            probe._torch_cache = cached
        _, index, biases, bias_index, has, sizes, segments, positions, longest_positions = cached
        grad_vec = torch.zeros(probe.n, device=device)
        if norms:
            grad_vec[index] = torch.stack(norms)
        zero_fraction = torch.full((probe.n,), math.nan, device=device)
        dead_fraction = torch.full((probe.n,), math.nan, device=device)
        zero = None
        if biases:
            # Every bias entry (a unit) at once: which are exactly zero, and per bias how many (the
            # same float32 share as (g == 0).float().mean(): a count of ones is exact).
            zero = (torch.cat([by_index[i].reshape(-1) for i in biases]) == 0).float()
            zero_fraction[bias_index] = torch.zeros(len(biases), device=device).index_add_(0, segments, zero) / sizes
        finite = torch.isfinite(grad_vec).all()
        global_norm = torch.linalg.vector_norm(grad_vec)
        if zero is not None and positions is not None:
            # Each unit's zero-gradient streak, in place (not on a step whose whole gradient is zero
            # or non-finite), and per bias the share of its units at UNIT_STREAK or more:
            # StepProbe._unit_streaks for the PyTorch backend.
            # A unit is dead past the longest streak a unit of its bias came back from.
            streak = probe.streak_var.value
            before = streak[positions]
            live = global_norm > 0
            after = torch.where(live, (before + 1.0) * zero, before)
            back = torch.zeros(len(biases), device=device).index_reduce_(0, segments, before * (1.0 - zero), "amax")
            longest = streak[longest_positions]
            longest = torch.where(live, torch.maximum(longest, back), longest)
            streak[positions] = after
            streak[longest_positions] = longest
            limit = (longest + 1.0).clamp_min(float(UNIT_STREAK))[segments]
            dead = torch.zeros(len(biases), device=device).index_add_(0, segments, (after >= limit).float())
            dead_fraction[bias_index] = dead / sizes
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


def _units_plan(probe: Any, present: list[int], by_index: dict[int, Any], device: Any) -> tuple[Any, ...]:
    """For the gradients present: their indices, the biases among them (the units), each bias
    entry's bias (``segments``) and its place in the probe's streak variable (``positions``; None
    when a bias gradient is not its variable's size), and the per-bias sizes."""
    import torch

    index = torch.tensor(present, dtype=torch.long, device=device)
    biases = [i for i in present if probe.layout.roles[i] == "bias"]
    has = torch.zeros(probe.n, device=device)
    has[index] = 1.0
    numel = [int(by_index[i].numel()) for i in biases]
    sizes = torch.tensor([float(k) for k in numel], device=device)
    segments = torch.repeat_interleave(torch.arange(len(biases), device=device), torch.tensor(numel, device=device))
    spans = [probe.unit_spans.get(i) for i in biases]
    positions = longest_positions = None
    if biases and all(span is not None and span[1] == k for span, k in zip(spans, numel)):
        positions = torch.cat([torch.arange(offset, offset + k, device=device) for offset, k in spans])
        longest_positions = torch.tensor([probe.longest_at[i] for i in biases], dtype=torch.long, device=device)
    return (index, biases, torch.tensor(biases, dtype=torch.long, device=device), has, sizes, segments, positions,
            longest_positions)
