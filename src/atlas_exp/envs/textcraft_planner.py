"""The TextCraft expert's plan: the fewest actions that make an episode's goal from its listed commands.

Fewest, since AgentGym stops an episode after 20 actions:
- each item is either fetched (`get`, when the game allows it: it has no recipe and is not a generic tag) or
  crafted with one of the listed commands; a generic ingredient ("planks") is replaced by one concrete member
  ("birch planks"), as the instruction permits; the choice minimises the number of actions, ties broken by
  the episode's rng so the recorded data vary;
- every base item is fetched once, in the total amount needed; an intermediate is crafted as many times as
  its total need requires (a craft action makes exactly one batch: the game requires the recipe's exact
  ingredient counts);
- actions follow a depth-first order (make an ingredient just before it is used).

Apart from the recorder (`textcraft_expert`) because it is pure search over the crafting tree: no env, no text.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass

from atlas_exp.envs.textcraft import TextCraftEpisode, crafting_tree, item_id, item_name

_COMMAND = re.compile(r"^craft (\d+) (.+?) using (.+)$")
_COUNT = re.compile(r"^(\d+) (.+)$")
_INF = float("inf")


@dataclass(frozen=True)
class Command:
    """One listed crafting command, parsed: `craft <out_count> <output> using <count> <input>, ...`."""

    text: str
    output: str  # item id
    out_count: int
    inputs: tuple[tuple[str, int], ...]  # (item or tag id, count), in the command's order

    @classmethod
    def parse(cls, text: str) -> "Command | None":
        m = _COMMAND.match(text.strip())
        if m is None:
            return None
        inputs = []
        for part in m.group(3).split(","):
            c = _COUNT.match(part.strip())
            if c is None:
                return None
            inputs.append((item_id(c.group(2)), int(c.group(1))))
        return cls(text=text.strip(), output=item_id(m.group(2)), out_count=int(m.group(1)), inputs=tuple(inputs))


@dataclass
class Action:
    """A planned action and what the thought before it should talk about."""

    kind: str  # "inventory" | "get" | "craft"
    text: str
    item: str = ""  # item id fetched or crafted
    amount: int = 0  # total fetched, or total needed of a crafted item
    batch: int = 1  # which craft of `batches`
    batches: int = 1
    command: Command | None = None
    concrete_inputs: tuple[tuple[str, int], ...] = ()
    consumers: tuple[str, ...] = ()
    substitutes: tuple[tuple[str, str], ...] = ()  # (generic tag, concrete item) used by this craft


class UncraftableGoal(Exception):
    """The goal cannot be made from the listed commands and fetchable items."""


class Planner:
    """Cheapest plan (fewest actions) for one episode, over its listed commands and the game's `get` rules."""

    def __init__(self, episode: TextCraftEpisode, rng: random.Random, tree=None):
        self.tree = tree or crafting_tree()
        self.goal = episode.goal
        self.rng = rng
        self.producers: dict[str, list[Command]] = defaultdict(list)
        for text in episode.commands:
            cmd = Command.parse(text)
            if cmd is not None:
                self.producers[cmd.output].append(cmd)
        self._options: dict[str, list] = {}
        self._memo: dict[tuple[str, int], float] = {}
        self._cuts = 0
        self.choice: dict[str, Command | None] = {}  # concrete item -> command (None: fetch it)
        self.member: dict[str, str] = {}  # generic tag -> the concrete item used for it

    # -- the game's rules
    def fetchable(self, item: str) -> bool:
        """What the game's `get` accepts: a known item with no recipe in the tree that is not a generic tag."""
        t = self.tree
        return not t.is_craftable(item) and not t.is_tag(item) and t.is_valid_item(item)

    def is_tag(self, name: str) -> bool:
        return self.tree.is_tag(name)

    def tag_members(self, tag: str) -> list[str]:
        return sorted(i for i, g in self.tree.item_id_to_tag.items() if g == tag)

    # -- cost model
    def options(self, name: str) -> list:
        """The ways to obtain `name`, in an rng-shuffled order (the first cheapest wins, so ties vary)."""
        if name not in self._options:
            if self.is_tag(name):
                opts: list = list(self.tag_members(name))
            else:
                opts = (["get"] if self.fetchable(name) else []) + list(self.producers.get(name, []))
            self.rng.shuffle(opts)
            self._options[name] = opts
        return self._options[name]

    def cost(self, name: str, qty: int, visiting: frozenset[str] = frozenset()) -> float:
        """Fewest actions to hold `qty` of `name`, counting shared ingredients once per use (an estimate).

        `visiting` cuts dependency cycles (possible through generic tags); a result computed while a cycle
        was cut depends on the path, so only cycle-free results are memoised.
        """
        key = (name, qty)
        if key in self._memo:
            return self._memo[key]
        if name in visiting:
            self._cuts += 1
            return _INF
        cuts_before = self._cuts
        visiting = visiting | {name}
        best = min((self._option_cost(name, opt, qty, visiting) for opt in self.options(name)), default=_INF)
        if self._cuts == cuts_before:
            self._memo[key] = best
        return best

    def _option_cost(self, name: str, opt, qty: int, visiting: frozenset[str]) -> float:
        if self.is_tag(name):
            return self.cost(opt, qty, visiting)
        if opt == "get":
            return 1
        batches = math.ceil(qty / opt.out_count)
        return batches + sum(self.cost(i, batches * c, visiting) for i, c in opt.inputs)

    def _best(self, name: str, qty: int):
        best, best_cost = None, _INF
        for opt in self.options(name):
            c = self._option_cost(name, opt, qty, frozenset({name}))
            if c < best_cost:
                best, best_cost = opt, c
        if best is None:
            raise UncraftableGoal(f"no way to obtain {item_name(name)}")
        return best

    # -- plan
    def concrete(self, name: str) -> str:
        return self.member.get(name, name)

    def _resolve(self, name: str, qty: int) -> None:
        """Fix how each item (and which member of each tag) is obtained, top-down from the goal."""
        if self.is_tag(name):
            if name not in self.member:
                self.member[name] = self._best(name, qty)
            name = self.member[name]
        if name in self.choice:
            return
        opt = self._best(name, qty)
        self.choice[name] = None if opt == "get" else opt
        if opt != "get":
            batches = math.ceil(qty / opt.out_count)
            for inp, c in opt.inputs:
                self._resolve(inp, batches * c)

    def plan(self) -> list[Action]:
        """The actions, without the optional inventory checks."""
        self._resolve(self.goal, 1)
        # consumers before producers: reverse post-order of the (acyclic) choice graph
        post: list[str] = []
        seen: set[str] = set()

        def visit(item: str) -> None:
            if item in seen:
                return
            seen.add(item)
            cmd = self.choice[item]
            if cmd is not None:
                for inp, _ in cmd.inputs:
                    visit(self.concrete(inp))
            post.append(item)

        visit(self.goal)
        need: dict[str, int] = defaultdict(int)
        need[self.goal] = 1
        batches: dict[str, int] = {}
        consumers: dict[str, list[str]] = defaultdict(list)
        for item in reversed(post):
            cmd = self.choice[item]
            if cmd is None:
                continue
            batches[item] = math.ceil(need[item] / cmd.out_count)
            for inp, c in cmd.inputs:
                concrete = self.concrete(inp)
                need[concrete] += batches[item] * c
                if item not in consumers[concrete]:
                    consumers[concrete].append(item)

        actions: list[Action] = []
        for item in post:  # producers before consumers
            cmd = self.choice[item]
            if cmd is None:
                actions.append(
                    Action("get", f"get {need[item]} {item_name(item)}", item=item, amount=need[item],
                           consumers=tuple(consumers[item]))
                )
                continue
            concrete_inputs = tuple((self.concrete(i), c) for i, c in cmd.inputs)
            subs = tuple((i, self.concrete(i)) for i, _ in cmd.inputs if self.concrete(i) != i)
            text = "craft {} {} using {}".format(
                cmd.out_count, item_name(item), ", ".join(f"{c} {item_name(i)}" for i, c in concrete_inputs)
            )
            for b in range(1, batches[item] + 1):
                actions.append(
                    Action("craft", text, item=item, amount=need[item], batch=b, batches=batches[item], command=cmd,
                           concrete_inputs=concrete_inputs, consumers=tuple(consumers[item]), substitutes=subs)
                )
        return actions


__all__ = ["Action", "Command", "Planner", "UncraftableGoal"]
