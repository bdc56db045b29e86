"""Offline evaluation: does the model reproduce a held-out expert's actions, step by step?

Success in a real environment is the paper's measure, but a small model after a short CPU run succeeds at
nothing, and an all-zero table cannot tell selectors apart. Teacher-forced expert steps can: for each
held-out expert trajectory, the model reads the expert's own history (one forward pass over the whole
trajectory, rendered exactly as in training) and at every step we check

- `action_correct`: whether greedy next-token prediction reproduces every token of the expert's action
  (the text from the step's last `Action:` marker to its end-of-turn token), given the expert's thought;
- `nll`: the mean negative log-likelihood of the step's tokens (thought and action).

An episode is one trajectory: score = the share of its steps whose action is reproduced (the task's value
in results.json is its mean, in %), success = all of them.
This is the behaviour-cloning counterpart of the paper's "step success" (and of Mind2Web's step accuracy);
the eval stage reports it as the `offline` split, never mixed into the held-in / held-out averages.

Tasks of this kind (`kind: expert_steps` in `conf/eval/*.yaml`) name a data source (`trajectories:`, any
`data.sources` entry: recorded TextCraft experts, AgentTraj-L files) and which of its trajectories are the
episodes (indices or trajectory ids). They need a local model: `policy=hf`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from atlas_exp.config import build
from atlas_exp.data.trajectory import Trajectory
from atlas_exp.errors import ConfigError

ACTION_MARKER = "Action:"


class ExpertTrajectories:
    """The trajectories a task draws its episodes from, loaded once, by index and by id."""

    def __init__(self, task_name: str, source_cfg: dict[str, Any]):
        self.task_name = task_name
        self.source_cfg = source_cfg

    @cached_property
    def trajectories(self) -> list[Trajectory]:
        from atlas_exp.data.sources import load_trajectories

        src = build(self.source_cfg, f"eval.tasks.{self.task_name}.trajectories")
        return load_trajectories([src], progress=False).trajectories

    def get(self, episode: int | str) -> Trajectory:
        trajs = self.trajectories
        if isinstance(episode, int) or str(episode).isdigit():
            i = int(episode)
            if not 0 <= i < len(trajs):
                raise ConfigError(f"eval.tasks.{self.task_name}.episodes: index {i} is outside the {len(trajs)} trajectories of its source")
            return trajs[i]
        for t in trajs:
            if t.id == episode:
                return t
        raise ConfigError(f"eval.tasks.{self.task_name}.episodes: no trajectory with id {episode!r} in its source")


def _action_start(tokenizer: Any, ids: list[int], a: int, b: int) -> int | None:
    """The index of the first token of the step [a, b) whose text follows the last `Action:` marker.

    The decoded length of ids[a:t] grows with t, so the first t whose text covers the marker is found by
    bisection: O(log n) decodes of the step, not one per token.
    """
    text = tokenizer.decode(ids[a:b])
    cut = text.rfind(ACTION_MARKER)
    if cut < 0:
        return None
    want = cut + len(ACTION_MARKER)
    lo, hi = a + 1, b  # the smallest end t in (a, b] with len(decode(ids[a:t])) >= want; decode(ids[a:b]) covers it
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[a:mid])) >= want:
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < b else None


def score_trajectory(model: Any, tokenizer: Any, traj: Trajectory, *, max_context: int) -> dict[str, Any]:
    """One forward pass over the expert trajectory; per-step action reproduction and NLL."""
    import torch
    import torch.nn.functional as F

    from atlas_exp.train.turn_spans import tokenize_trajectory

    tt = tokenize_trajectory(tokenizer, traj)
    ids = tt.input_ids[:max_context]
    spans = [(a, b) for a, b in tt.step_spans if b <= len(ids)]
    keep = torch.zeros(len(ids), dtype=torch.bool)
    for a, b in spans:
        keep[a - 1:b - 1] = True  # position t predicts token t + 1
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=device), logits_to_keep=keep[None].to(device))
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float().cpu()
    row = {int(p): i for i, p in enumerate(keep.nonzero().flatten().tolist())}
    steps = []
    for k, (a, b) in enumerate(spans):
        pos = torch.tensor([row[p] for p in range(a - 1, b - 1)])
        target = torch.tensor(ids[a:b])
        step_logits = logits[pos]
        pred = step_logits.argmax(-1)
        act = _action_start(tokenizer, ids, a, b)
        steps.append({
            "step": k,
            "nll": round(float(F.cross_entropy(step_logits, target)), 5),
            "action": tokenizer.decode(ids[act:b], skip_special_tokens=True).strip() if act is not None else None,
            "action_correct": bool(act is not None and bool((pred[act - a:] == target[act - a:]).all())),
        })
    n = len(steps)
    correct = sum(s["action_correct"] for s in steps)
    return {
        "trajectory": traj.id,
        "success": n > 0 and correct == n,
        # the share of steps reproduced, in [0, 1] like every env's score (results.json reports it in %)
        "score": round(correct / n, 6) if n else 0.0,
        "reward": round(correct / n, 6) if n else 0.0,
        "turns": n,
        "n_steps": traj.n_steps,
        "n_steps_scored": n,
        "nll": round(sum(s["nll"] for s in steps) / n, 5) if n else None,
        "end": "done" if n == traj.n_steps else "context_limit",
        "invalid_actions": sum(s["action"] is None for s in steps),
        "attempts": 1,
        "steps": steps,
        "messages": [{"role": m.role, "content": m.content} for m in traj.messages],
    }


def local_model(policy: Any, task_name: str) -> tuple[Any, Any, int]:
    """(model, tokenizer, max_context) of a policy that runs a local transformers model."""
    model, tok = getattr(policy, "model", None), getattr(policy, "tokenizer", None)
    if model is None or tok is None or not hasattr(model, "parameters"):
        raise ConfigError(
            f"eval.tasks.{task_name} (kind: expert_steps) scores the model's own next-token predictions: it needs "
            f"policy=hf, not policy={getattr(policy, 'name', '?')}"
        )
    return model, tok, int(getattr(policy, "max_context", 4096))
