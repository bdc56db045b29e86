"""LMRL-Gym's Wordle with AgentGym's wording, written from the AgentTraj-L wordle trajectories.

What replaying the real data pins down (wording, scoring, versions, costs): docs/envs.md#wordle-lmrl-gym."""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from atlas_exp.envs.base import (
    Env,
    EpisodeSpec,
    StepResult,
    agentgym_action,
    item_number,
)
from atlas_exp.errors import ConfigError, DataError

#: The first human turn of every AgentTraj-L Wordle conversation, verbatim.
INSTRUCTION = "You are an expert wordle player."

#: The vocabulary the data's prompt lists, shipped with the package (header: origin and licence).
VOCAB_FILE = Path(__file__).resolve().parent / "data" / "wordle_vocab.txt"

N_LETTERS = 5
#: guesses per episode, invalid ones included
N_TRIES = 6
INVALID = "invalid word"

_LETTERS = frozenset(string.ascii_lowercase)
#: item id prefixes: AgentTraj-L's, and the short form
ITEM_PREFIXES = ("lmrlgym_wordle_", "wordle_")

# AgentGym's Wordle client's first observation around the vocabulary, verbatim from the data.
_PROMPT_HEAD = (
    "Welcome to the game of Wordle. Your objective is to guess a hidden 5 letter word. You have 6 attempts to guess it correctly and you should try to guess it in as few attempts as possible. When guessing the word, you should format your word as a space separated sequence of letters, like \"s h i r e\" for example. After guessing the word, you will receive feedback from the game environment in the form of a sequence of 5 space separated letters like \"b y g g b\", where each letter indicates some information about the hidden word. The environment will return one of three letters – \"b\", \"g\", or \"y\" – for each letter in the word you guessed. We describe the meaning of each letter below:\n"
    "\n"
    "\"b\": If the environment returns a \"b\", it means that the letter at that position in your guessed word is not in the hidden word.\n"
    "\"y\": If the environment returns a \"y\", it means that the letter at that position in your guessed word is in the hidden word but is not in the correct position.\n"
    "\"g\": If the environment returns a \"g\", it means that the letter at that position in your guessed word is in the hidden word and is in the correct position.\n"
    "\n"
    "As a note, if you guess an invalid word (e.g. not a 5 letter word or a word not in the vocabulary), the environment will respond with an \"invalid word\" message. In general though, you should use this information returned by the environment to update your belief about what the hidden word might be and adjust your next guess accordingly.\n"
    "\n"
    "Here is the complete list of valid vocabulary words that are accepted by the game:\n"
    "```\n"
)
_PROMPT_TAIL = (
    "```\n"
    "\n"
    "Here is an example. If the current status of the game is given as:\n"
    "```\n"
    "guess 1: p a n i c\n"
    "feedback 1: b b y b b\n"
    "guess 2: f e l o n\n"
    "feedback 2: g b b y g\n"
    "```\n"
    "Based on the feedback from the environment, you know that the first letter is \"f\", the last letter is \"n\", and there is an \"o\" somewhere in the word, but it is not in the second to last position. You also know that there is not a \"p\", \"a\", \"i\", \"c\", \"e\", or \"l\" in the word. Knowing this, you might guess the next word to be:\n"
    "Thought:\n"
    "I know that the first letter is \"f\", the last letter is \"n\", and there is an \"o\" somewhere in the word, but it is not in the second to last position. I also know that there is not a \"p\", \"a\", \"i\", \"c\", \"e\", or \"l\" in the word. A good word from the vocabulary to try might therefore be \"f r o w n\", since it is in the vocabulary, meets all known letter constraints, and we get to gain more information about the position of \"o\". Therefore this is a good guess to try next.\n"
    "\n"
    "Action:\n"
    "f r o w n\n"
    "\n"
    "Formally, your return should be in this format:\n"
    "Thought:\n"
    "<Your Thought>\n"
    "\n"
    "Action:\n"
    "<The Word You Guess>\n"
    "\n"
    "The guessed word is in the vocabulary, meets all known letter constraints, and we get to gain more information about the position of \"o\", so it is a good guess to try next.\n"
    "\n"
    "Now let's start a new game. Remember, the word you guess should be strictly in the vocabulary. You should return your thought and your word strictly in the formation mentioned above.\n"
)


def read_vocabulary(path: str | Path) -> tuple[str, ...]:
    """The words of a vocabulary file: one per line; blank lines and lines starting with '#' skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"vocab_file: cannot read {path}: {e.strerror or e}") from None
    words = tuple(w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#"))
    bad = [w for w in words if len(w) != N_LETTERS or not set(w) <= _LETTERS]
    if bad or not words:
        raise ConfigError(f"vocab_file: {path} must list 5-letter lowercase words, one per line; bad: {bad[:5]}")
    if len(set(words)) != len(words):
        raise ConfigError(f"vocab_file: {path} lists a word twice")
    return words


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """The 431 words of the data's prompt, in its order."""
    return read_vocabulary(VOCAB_FILE)


def first_observation(vocab: Sequence[str] | None = None) -> str:
    """The first observation: the client's rules with `vocab` (default: the data's) listed, as in the data."""
    words = vocabulary() if vocab is None else vocab
    return _PROMPT_HEAD + "\n".join(words) + "\n" + _PROMPT_TAIL


def feedback(guess: str, target: str) -> str:
    """`g`/`y`/`b` per letter, space-separated, with the data's trailing newline (letters not counted)."""
    marks = ("g" if g == t else "y" if g in target else "b" for g, t in zip(guess, target))
    return " ".join(marks) + "\n"


def target_for(seed: int, vocab: Sequence[str] | None = None) -> str:
    """Our hidden word for item/seed `seed`: `random.Random(seed).choice(vocab)` (see the module docstring)."""
    return random.Random(seed).choice(tuple(vocabulary() if vocab is None else vocab))


@dataclass(frozen=True)
class WordleEpisode(EpisodeSpec):
    """The hidden word of an episode (5 lowercase letters)."""

    target: str = ""

    def __post_init__(self) -> None:
        if len(self.target) != N_LETTERS or not set(self.target) <= _LETTERS:
            raise DataError(f"a Wordle target is 5 lowercase letters a-z, got {self.target!r}", source=self.id or None)

    @classmethod
    def from_item(cls, item: int | str) -> WordleEpisode:
        """Item n (or `"lmrlgym_wordle_<n>"`) -> our seeded hidden word for it (`target_for(n)`)."""
        item = item_number(item, ITEM_PREFIXES, "Wordle")
        return cls(id=f"lmrlgym_wordle_{item}", target=target_for(item))


class WordleEnv(Env):
    """Wordle with AgentGym's wording; one episode at a time.

    `reset(WordleEpisode)` plays a given hidden word; `reset(n: int)` plays `WordleEpisode.from_item(n)`.
    `vocab_file` replaces the data's vocabulary (same format as `data/wordle_vocab.txt`); the prompt then
    lists it.
    """

    name = "wordle"

    def __init__(self, vocab_file: str | Path | None = None, max_guesses: int = N_TRIES):
        if max_guesses < 1:
            raise ValueError(f"max_guesses must be >= 1, got {max_guesses}")
        self.vocab = vocabulary() if vocab_file is None else read_vocabulary(vocab_file)
        self._vocab_set = frozenset(self.vocab)
        self.max_guesses = max_guesses
        self.episode: WordleEpisode | None = None
        self.guesses: list[str] = []
        self.done = False

    def instruction(self) -> str:
        return INSTRUCTION

    def reset(self, episode: EpisodeSpec | int) -> str:
        if isinstance(episode, bool) or not isinstance(episode, (int, WordleEpisode)):
            raise TypeError(f"WordleEnv.reset takes a WordleEpisode or an item index, got {type(episode).__name__}")
        if isinstance(episode, int):
            episode = WordleEpisode(id=f"lmrlgym_wordle_{episode}", target=target_for(episode, self.vocab))
        if episode.target not in self._vocab_set:
            raise DataError(f"the hidden word {episode.target!r} is not in the vocabulary", source=episode.id or None)
        self.episode = episode
        self.guesses = []
        self.done = False
        return first_observation(self.vocab)

    def is_valid(self, word: str) -> bool:
        return len(word) == N_LETTERS and set(word) <= _LETTERS and word in self._vocab_set

    def step(self, action: str) -> StepResult:
        if self.episode is None:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episode is over; call reset() to start another")
        word = action.strip().replace(" ", "")
        valid = self.is_valid(word)
        self.guesses.append(word)
        solved = valid and word == self.episode.target
        self.done = solved or len(self.guesses) >= self.max_guesses
        return StepResult(
            observation=feedback(word, self.episode.target) if valid else INVALID,
            reward=1.0 if solved else 0.0,
            done=self.done,
            success=solved,
            info={"action": action, "word": word, "recognized": valid, "steps": len(self.guesses),
                  "truncated": False},
        )

    def action_from_reply(self, reply: str) -> str | None:
        """What AgentGym's LMRL-Gym client sent when the data were recorded: the text after the first
        `Action:` (up to a second one), stripped; None when there is none (see `base.agentgym_action`)."""
        return agentgym_action(reply)


__all__ = [
    "INSTRUCTION",
    "INVALID",
    "N_TRIES",
    "VOCAB_FILE",
    "WordleEnv",
    "WordleEpisode",
    "feedback",
    "first_observation",
    "read_vocabulary",
    "target_for",
    "vocabulary",
]
