"""Step selectors: which steps of a trajectory get trained (the heart of ATLaS)."""

from atlas_exp.selectors.base import Selection, Selector, StepChoice

__all__ = ["Selection", "Selector", "StepChoice"]
