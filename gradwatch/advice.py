"""What to do about each kind of finding, in one sentence per kind.

Each finding's own ``message`` says what was seen at which layers; the advice here is the general
remedy for its kind, shown next to the findings by the text summary of ``gradwatch check``, the
JUnit XML and the HTML report.

>>> from gradwatch.advice import advice_for
>>> advice_for("vanishing").startswith("Insert BatchNorm")
True
"""

from __future__ import annotations

ADVICE: dict[str, str] = {
    "nonfinite": (
        "Look at the first layer listed as non-finite: a sqrt, log or division at zero, or the norm "
        "of an all-zero vector, in its forward pass; under mixed precision use a GradScaler "
        "(PyTorch) or LossScaleOptimizer (Keras). policy='auto' skips the poisoned steps."
    ),
    "exploding": (
        "Lower the learning rate or warm it up, clip the global gradient norm "
        "(torch.nn.utils.clip_grad_norm_, Keras global_clipnorm), and check the initialisation "
        "scale. policy='auto' clips and decays the learning rate on the spot."
    ),
    "vanishing": (
        "Insert BatchNorm/LayerNorm after the layers named in the finding, use ReLU/GELU with He "
        "initialisation instead of sigmoid/tanh, or add residual connections."
    ),
    "dead_units": (
        "Lower the learning rate, use LeakyReLU/GELU, or initialise biases at >= 0 with He "
        "initialisation, so the units' pre-activations are not negative on every input."
    ),
    "loss_spike": (
        "Inspect the batch at that step (bad labels, outliers, a data-loading bug), and lower the "
        "learning rate or clip the gradient norm if spikes repeat."
    ),
}
"""Advice per built-in finding kind."""


def advice_for(kind: str) -> str:
    """The advice for a finding kind; a pointer to the finding's message for plugin kinds.

    Args:
        kind: A finding kind (``"exploding"``, or a plugin's own kind).

    Returns:
        One or two sentences a person can act on.
    """
    return ADVICE.get(kind, "See the finding's message; this kind comes from a gradwatch plugin.")
