"""The command groups of the ``dicebox`` command line (entry point: :mod:`dicebox.cli`).

One module per group: :mod:`.datasets` (``dataset ...``), :mod:`.learn` (``train``,
``evolve``), :mod:`.jobs` (``jobs ...`` and following a job), :mod:`.models` (``models ...``,
``classify``); :mod:`.common` holds what they share (errors and exit codes, output for
terminals, pipes and ``--json``, the server client).
"""
