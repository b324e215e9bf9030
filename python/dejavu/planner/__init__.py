"""Planner, profiler and simulator: choose the prompt/token split and predict throughput."""
from .model import PlanError, Profile

__all__ = ["PlanError", "Profile"]
