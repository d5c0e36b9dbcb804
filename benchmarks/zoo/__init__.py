"""The zoo: a randomised evaluation of gradwatch on whole training runs nobody tuned it for.

A seed draws a run (:func:`.sampler.sample`: model family, optimizer, schedule, batch size,
regularisers, a scikit-learn dataset, and for a share of seeds a pathology injected at a random
onset); the run's label is confirmed by an unwatched, probed run (:mod:`.labels`; unconfirmed runs
are dropped); the same run is then watched under ``observe`` (detection, false alarms) and under
the default ``auto`` (harm and rescue), see :mod:`.evaluate`; :mod:`.scoring` and :mod:`.report`
total and list everything. Seeds 0-99 are for tuning gradwatch, 8000-8599 for the next report (8000-8199 in Keras; 1000-1599 to 7000-7599 were earlier report sets, then studied; see NOTE.md).

Framework-free: :mod:`.spec`, :mod:`.sampler`, :mod:`.pathologies` (the table of pathologies and
their expected finding kinds), :mod:`.data`, :mod:`.labels`, :mod:`.evaluate`, :mod:`.scoring`,
:mod:`.report`, :mod:`.workers` (processes). PyTorch: :mod:`.torch_runner` only.
``python -m benchmarks.zoo --help``.
"""
