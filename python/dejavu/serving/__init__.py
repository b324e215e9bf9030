"""Serving across processes: the controller (pipeline engine) and its workers."""
