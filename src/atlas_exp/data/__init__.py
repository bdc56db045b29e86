"""Trajectories and their selections: the canonical records, importers from public formats, and filters."""

from atlas_exp.data.selection import Selection, StepChoice
from atlas_exp.data.trajectory import Message, Trajectory

__all__ = ["Message", "Selection", "StepChoice", "Trajectory"]
