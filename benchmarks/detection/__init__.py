"""The detection benchmark: labelled training scenarios and a runner that scores gradwatch on them.

* :mod:`.scoring` (framework-neutral): label checks, outcomes, totals, markdown tables.
* :mod:`.torch_harness`, :mod:`.torch_checks`, :mod:`.torch_models`: running PyTorch scenarios
  unwatched (with a plain-autograd probe that checks the label) and watched.
* :mod:`.torch_healthy`, :mod:`.torch_pathologies`: the PyTorch scenarios.
* :mod:`.keras_harness`, :mod:`.keras_scenarios`: the Keras 3 scenarios (``model.fit`` with the
  ``GradWatch`` callback).
* ``python -m benchmarks.detection``: run them and print or write the tables.
"""
