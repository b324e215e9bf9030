"""The distributed core: the controller assembled from parts, the worker and its roles, the typed
control protocol (messages.py)."""
