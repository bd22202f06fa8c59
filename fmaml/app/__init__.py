"""The ``fmaml`` application: the command line and the jobs it runs, built on the library.

``import fmaml`` is the library (the scan, the checkpoint policies, MAML, the optimizers, the
data). This package is one application of it: it imports the library, and the library never
imports it. Nothing here is part of the library's API.

Commands, one module each:

- ``main.py``: the ``fmaml`` command (``python -m fmaml``, console script ``fmaml``).
- ``train.py``: ``fmaml train TASK``: resolve the options, prepare the run directory, train,
  evaluate, report.
- ``plan.py``: ``fmaml plan``, the cost of each checkpoint policy.
- ``demo.py``: ``fmaml demo``, checkpoint plans and an exact meta-gradient.

What ``fmaml train`` is made of:

- ``options.py``: its options and their types, shared by the parser and by the check of a
  saved ``config.json``; ``config.py``: a run's configuration resolved and checked before
  anything is written; ``errors.py``: one-line errors and exit statuses.
- ``rundir.py``: run directories (new, resumed, locked, checked); ``files.py``: atomic writes;
  ``metrics.py``: the metrics log (recovered on resume) and the training curve.
- ``loop.py``: the meta-training loop; ``evaluation.py``: evaluation on held-out tasks;
  ``progress.py``: the progress line; ``signals.py``: SIGINT and SIGTERM; ``ranks.py``: steps
  on every ``torchrun`` rank or on rank 0.
- ``jobs/``: the training jobs, one per benchmark (``sinusoid.py``, ``omniglot.py``).
"""
