"""Keep the Keras tests cheap on a shared CPU: one intra-op thread for the PyTorch backend
(thread contention between test processes costs more than the second thread gains)."""

from __future__ import annotations

import os

if os.environ.get("KERAS_BACKEND") == "torch":
    try:
        import torch
    except ImportError:  # the tests importorskip what they need
        pass
    else:
        torch.set_num_threads(1)
