"""Evaluation: the model as a ReAct agent in real envs (policy -> rollout -> results.json)."""
