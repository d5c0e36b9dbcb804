"""The host side of the Keras probe: read the ring of statistics, write the controls.

Split from :mod:`gradwatch.integrations.keras.step` (the in-graph side) to keep each module to
one theme; :class:`~gradwatch.integrations.keras.step.StepProbe` mixes it in.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from gradwatch.policy import Controls


def controls_vector(controls: Controls) -> np.ndarray:
    """The controls as the float32 vector the compiled step reads: ``[skip, clip_norm, lr_factor]``."""
    return np.array(
        [1.0 if controls.skip_nonfinite else 0.0, controls.clip_norm, controls.lr_factor], dtype=np.float32
    )


class ProbeReader:
    """Reading and writing a probe's variables from the host, on every backend."""

    backend: str
    keras: Any
    model: Any
    lock: Any
    ready: bool
    ring: int
    positions: list[int]
    ring_var: Any
    count_var: Any
    controls_var: Any
    _count: int
    _controls: Controls

    # -- host side -----------------------------------------------------------------------------

    def read(self) -> tuple[int, np.ndarray]:
        """The step counter and the ring of rows, as numpy (one device-to-host transfer each).

        On JAX the variables are detached during ``fit``; the newest state lives in
        ``model._jax_state``, whose arrays the next step may donate: a read that loses that race
        retries on the newer state (the ring still holds the rows).
        """
        if not self.ready:
            return self._count, np.zeros((self.ring, 0), dtype=np.float32)
        with self.lock:
            if self.backend == "jax":
                return self._read_jax()
            ops = self.keras.ops
            return int(ops.convert_to_numpy(self.count_var.value)), np.array(
                ops.convert_to_numpy(self.ring_var.value), copy=True
            )

    def _read_jax(self) -> tuple[int, np.ndarray]:
        deadline = time.monotonic() + 60.0
        while True:
            state = getattr(self.model, "_jax_state", None)
            try:
                if state and state.get("optimizer_variables"):
                    values = state["optimizer_variables"]
                    count = np.array(values[self.positions[1]], copy=True)
                    ring = np.array(values[self.positions[0]], copy=True)
                else:
                    count = np.array(self.count_var.value, copy=True)
                    ring = np.array(self.ring_var.value, copy=True)
                return int(count), ring
            except RuntimeError as exc:
                if "deleted" not in str(exc) or time.monotonic() > deadline:
                    raise
            # The next step donated these arrays: its own state (with our rows) comes next.
            while getattr(self.model, "_jax_state", None) is state and time.monotonic() < deadline:
                time.sleep(0.0005)

    def write_controls(self, controls: Controls) -> None:
        """Write new standing orders; call between steps, on the thread that runs ``fit``."""
        if not self.ready:
            self._controls = controls
            return
        if self.backend == "jax" and getattr(self.model, "_jax_state", None):
            # The variables are detached while fit runs; sync them back so the next step reads
            # the whole state (ours included) from the variables again.
            self.model.jax_state_sync()
        self.controls_var.assign(controls_vector(controls))
