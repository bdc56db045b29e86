"""atlas_exp: agent tuning via learning critical steps (ATLaS, arXiv 2503.02197).

Stages, each reading the previous stage's artifact from the run directory:
trajectories -> selection -> training -> evaluation -> report.
"""

__version__ = "0.1.0"
