"""The sweep engine behind ``platform.tune`` and ``platform.study``, one concept a module:

- ``flags``: the sweep's command-line side: its flags, declared once for both CLIs, the frozen settings they
  become, and ``present``, which prints an outcome as the CLIs do;
- ``plan``: the sweep's settings — grid, trial runner, GPU share, concurrency — checked before Ray starts;
- ``state``: ``SweepState``, the sweep folder's state file that ``--resume`` reads, and the resume command;
- ``tuner``: the Ray Tune ``Tuner`` (trainable, resources, search space, scheduler);
- ``run``: ``run_sweep``, from the checks to the ``SweepOutcome``, in the order a sweep goes; it prints nothing;
- ``interrupt``: Ctrl-C during a sweep;
- ``parent_run``: the sweep's MLflow parent run, opened and closed, and the trial runs repaired;
- ``trial_runs``: the trials' MLflow child runs (opened, an epoch logged, closed);
- ``outcome``: ``SweepOutcome``, the trials' rows, the best trial, its registration;
- ``timing`` and ``report``: where the time went, and what a person reads at the end.

A trial's own code lives beside it: ``platform/trials.py`` (the two trial paths), ``platform/sweep_tracking.py``
(the Ray Tune callback that logs the trials as they go) and ``platform/trial_stopping.py`` (ASHA for Ray Train trials).
"""
