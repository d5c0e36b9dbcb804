"""Keras 3 adapter: ``model.fit(x, y, callbacks=[GradWatch()])`` on TensorFlow, PyTorch and JAX.

The callback is a thin shell around a :class:`gradwatch.Monitor`. The measuring and the remedies
happen inside the compiled training step, in the optimizer's ``apply`` (see
:mod:`gradwatch.integrations.keras.step`); the callback (:mod:`~gradwatch.integrations.keras.callback`) reads one small block of statistics per
measured batch, hands each optimizer step to the monitor and writes the monitor's standing orders
(:class:`gradwatch.Controls`) back into the step's variables.

Example:
    >>> import keras, numpy as np
    >>> from gradwatch import GradWatch
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"),
    ...                           keras.layers.Dense(1)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> cb = GradWatch()
    >>> history = model.fit(np.ones((32, 8)), np.ones((32, 1)), epochs=1, verbose=0, callbacks=[cb])
    >>> cb.report().healthy, "grad_norm" in history.history
    (True, True)
"""


from __future__ import annotations

from gradwatch.errors import require

require("keras", "keras")  # a missing Keras raises MissingExtraError naming the extra to install

from .callback import GradWatch  # noqa: E402

__all__ = ["GradWatch"]
