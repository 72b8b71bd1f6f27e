"""PostgreSQL and an MLflow tracking server on it, on this machine, for a team (``make services``)
and for the tests (``tests/service_fixtures.py``). Not part of the library or the flows: the
pipeline only sees ``MLFLOW_TRACKING_URI``."""
