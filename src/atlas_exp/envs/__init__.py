"""Text environments with AgentGym's wording (see `base.Env`), and scripted experts that record data in them."""

from atlas_exp.envs.base import Env, EpisodeSpec, StepResult, parse_action

__all__ = ["Env", "EpisodeSpec", "StepResult", "parse_action"]
