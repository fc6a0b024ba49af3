"""A words-only speaker classifier: the yardstick for speaker identification.

Speaker identification asks which character's gate fits a held-out line best. How high that
can go depends on how much of a voice one line gives away. A multinomial naive Bayes over
word unigrams and bigrams, trained on the same training dialogues and scored on the same
held-out turns, measures that from the words alone: blocks that score near it carry about
as much of each voice as the words do. Its smoothing is chosen by cross-validation over the
training dialogues, never by the held-out turns.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise

from neeko.dialogues import Dialogue

ALPHAS = (0.03, 0.1, 0.3, 1.0)
"""Additive-smoothing strengths the cross-validation chooses from."""

_WORD = re.compile(r"\w+(?:'\w+)*")


def features(text: str) -> list[str]:
    """Lower-cased words and adjacent word pairs."""
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in pairwise(words)]


def character_turns(dialogues: Iterable[Dialogue]) -> list[tuple[str, str]]:
    """(speaker, text) of every character turn."""
    return [(d.character, t) for d in dialogues for role, t in d.messages if role == "character"]


class WordClassifier:
    """Multinomial naive Bayes over `features`, with a uniform prior over speakers."""

    def __init__(self, turns: Sequence[tuple[str, str]], alpha: float) -> None:
        if alpha <= 0:
            raise ValueError("alpha must be positive")
        self.counts: dict[str, Counter[str]] = {}
        for speaker, text in turns:
            self.counts.setdefault(speaker, Counter()).update(features(text))
        if len(self.counts) < 2:
            raise ValueError("a speaker classifier needs turns of two speakers or more")
        self.vocab = set().union(*self.counts.values())
        self._smooth(alpha)

    def with_alpha(self, alpha: float) -> WordClassifier:
        """The same counts under another smoothing (nothing is recounted)."""
        if alpha <= 0:
            raise ValueError("alpha must be positive")
        other = copy.copy(self)
        other._smooth(alpha)
        return other

    def _smooth(self, alpha: float) -> None:
        self.alpha = alpha
        self._log_total = {
            s: math.log(c.total() + alpha * len(self.vocab)) for s, c in self.counts.items()
        }

    def scores(self, text: str) -> dict[str, float]:
        """Log-likelihood of `text`'s known features under each speaker."""
        feats = [f for f in features(text) if f in self.vocab]
        return {
            s: sum(math.log(c[f] + self.alpha) for f in feats) - len(feats) * self._log_total[s]
            for s, c in self.counts.items()
        }

    def predict(self, text: str) -> str:
        """The likeliest speaker (ties go to the speaker seen first in training)."""
        scores = self.scores(text)
        return max(scores, key=scores.__getitem__)

    def accuracy(self, turns: Sequence[tuple[str, str]]) -> float:
        """The share of (speaker, text) turns predicted right."""
        if not turns:
            raise ValueError("no turns to score")
        return sum(self.predict(text) == s for s, text in turns) / len(turns)


def choose_alpha(
    train: Sequence[Dialogue], alphas: Sequence[float] = ALPHAS, folds: int = 5
) -> float:
    """The `alphas` entry with the best accuracy over `folds` folds of whole dialogues.

    Each speaker's dialogues are dealt to the folds in turn, so every fold holds some of
    every speaker; the first alpha wins ties. With too few dialogues to hold any out, it is
    Laplace's 1.0.
    """
    fold_of: list[int] = []
    seen: Counter[str] = Counter()
    for d in train:
        fold_of.append(seen[d.character] % folds)
        seen[d.character] += 1
    splits = []
    for k in range(folds):
        fit = character_turns(d for d, f in zip(train, fold_of, strict=True) if f != k)
        test = character_turns(d for d, f in zip(train, fold_of, strict=True) if f == k)
        if test and len({s for s, _ in fit}) >= 2:
            splits.append((WordClassifier(fit, alphas[0]), test))
    if not splits:
        return 1.0

    def cv(alpha: float) -> float:
        return sum(clf.with_alpha(alpha).accuracy(test) for clf, test in splits)

    return max(alphas, key=cv)


def word_speaker_id(train: Sequence[Dialogue], heldout: Sequence[Dialogue]) -> dict:
    """Accuracy of the words-only classifier on `heldout`'s character turns.

    Every held-out speaker needs training dialogues; the classifier chooses among all the
    training speakers. Returns {"accuracy", "hits", "turns", "alpha"}.
    """
    speakers = {d.character for d in train}
    if missing := {d.character for d in heldout} - speakers:
        raise ValueError(f"no training dialogues for {', '.join(sorted(missing))}")
    if not (turns := character_turns(heldout)):
        raise ValueError("no held-out character turns")
    alpha = choose_alpha(train)
    clf = WordClassifier(character_turns(train), alpha)
    hits = sum(clf.predict(text) == s for s, text in turns)
    return {"accuracy": hits / len(turns), "hits": hits, "turns": len(turns), "alpha": alpha}
