"""The demonstration behind ``make demo`` / ``gradwatch demo``.

With PyTorch installed it trains small real models (see ``gradwatch.integrations.torch.demo``),
then runs ``gradwatch doctor`` on one vanishing and one exploding model
(``gradwatch.integrations.torch.doctor_demo``);
with ``synthetic=True``, or without PyTorch, it replays synthetic gradient streams through a
:class:`~gradwatch.Monitor` so the diagnosis and the remedies can be seen with numpy alone.
"""

from __future__ import annotations

import importlib.util

from gradwatch.monitor import Monitor
from gradwatch.testing import exploding_stream, nan_at, vanishing_stream


def run_synthetic() -> int:
    scenarios = [
        ("A deep saturating MLP (synthetic): gradients shrink 5x per layer towards the input",
         vanishing_stream(steps=40)),
        ("A learning rate that is too high (synthetic): the norm doubles every step from step 60",
         exploding_stream(onset=60, steps=90)),
        ("A NaN produced in fc2 behind a finite loss (synthetic), at step 30", nan_at(step=30, steps=40)),
    ]
    for title, stream in scenarios:
        monitor = Monitor(policy="auto")
        for stats in stream:
            monitor.observe(stats)
        print("=" * 100)
        print(title)
        print("=" * 100)
        print(monitor.report().summary())
        print()
    return 0


def run_demo(synthetic: bool = False, doctor: bool = True) -> int:
    """Run the demo; returns the exit code (0).

    Args:
        synthetic: Replay synthetic streams instead of training models. Defaults to False.
        doctor: With PyTorch, also run the doctor on a vanishing and an exploding model.
            Defaults to True.
    """
    if not synthetic and importlib.util.find_spec("torch") is not None:
        try:
            from gradwatch.integrations.torch.demo import main as torch_main
        except ImportError:
            pass
        else:
            code = int(torch_main())
            if doctor:
                from gradwatch.integrations.torch.doctor_demo import main as doctor_main

                code = code or int(doctor_main())
            return code
    return run_synthetic()
