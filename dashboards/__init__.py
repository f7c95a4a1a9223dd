"""Pictures of tracked CoOp sweeps, read from MLflow and logged back to the sweep run: ``python -m dashboards``
(see ``dashboards.report`` for the files)."""
