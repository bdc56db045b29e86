"""Trajectories: the canonical model, importers from public formats, and filters."""

from atlas_exp.data.trajectory import Message, Trajectory

__all__ = ["Message", "Trajectory"]
