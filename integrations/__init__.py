"""Framework adapters, shipped as ``gradwatch.integrations``.

Each module imports its framework on import and raises :class:`gradwatch.MissingExtraError`
naming the ``pip install`` to run when it is missing. An adapter only measures, hands a
:class:`gradwatch.StepStats` to a :class:`gradwatch.Monitor`, and carries out its decisions.
"""
