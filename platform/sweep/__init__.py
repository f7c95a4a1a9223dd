"""The sweep engine behind ``platform.tune`` and ``platform.study``, one concept a module:

- ``plan``: the sweep's settings — grid, trial runner, GPU share, concurrency — checked before Ray starts;
- ``state``: the sweep folder's state file, what ``--resume`` reads;
- ``tuner``: the Ray Tune ``Tuner`` (trainable, resources, search space, scheduler);
- ``run``: ``run_sweep``, from the checks to the report;
- ``interrupt``: Ctrl-C during a sweep;
- ``parent_run``: the sweep's MLflow parent run, opened and closed;
- ``outcome``: the trials' rows, the best trial, its registration;
- ``timing`` and ``report``: where the time went, and what a person reads at the end.

A trial's own code lives beside it: ``platform/trials.py`` (the two trial paths), ``platform/sweep_tracking.py``
(the trials' MLflow child runs) and ``platform/trial_stopping.py`` (ASHA for Ray Train trials).
"""
