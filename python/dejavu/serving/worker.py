"""`dejavu worker` lives in cluster/worker.py (the process) and cluster/roles/ (what it plays)."""
from ..cluster.worker import Worker, run  # noqa: F401
