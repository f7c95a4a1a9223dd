"""Pictures and reports of tracked CoOp runs, read from MLflow (see ``dashboards.report``)."""
