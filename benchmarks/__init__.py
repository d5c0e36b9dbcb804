"""gradwatch benchmarks: detection quality, remedy success and overhead, each rerunnable.

Run from the repository root: ``python -m benchmarks.detection``, ``python -m benchmarks.remedy``,
``python -m benchmarks.overhead``, or all three in quick mode with ``make bench``. See
``benchmarks/README.md``.
"""
