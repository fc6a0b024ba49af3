"""The words-only speaker classifier that speaker identification is read against."""

import math

import pytest

from neeko.dialogues import Dialogue
from neeko.word_classifier import (
    ALPHAS,
    WordClassifier,
    choose_alpha,
    features,
    word_speaker_id,
)


def _d(name: str, *lines: str) -> Dialogue:
    messages = [m for line in lines for m in (("user", "Well?"), ("character", line))]
    return Dialogue(name, messages)


def test_features_are_lowercased_words_and_adjacent_pairs():
    assert features("Now is the WINTER of our discontent; don't") == [
        "now", "is", "the", "winter", "of", "our", "discontent", "don't",
        "now is", "is the", "the winter", "winter of", "of our", "our discontent",
        "discontent don't",
    ]  # fmt: skip
    assert features("") == []


def test_scores_are_the_smoothed_multinomial_log_likelihood():
    clf = WordClassifier([("A", "crown crown"), ("B", "sword")], alpha=0.5)
    # vocab: crown, sword, "crown crown" (3); A holds 3 features (crown 2), B 1 (sword).
    a = 2 * math.log(2 + 0.5) + math.log(1 + 0.5) - 3 * math.log(3 + 3 * 0.5)
    b = 3 * math.log(0 + 0.5) - 3 * math.log(1 + 3 * 0.5)
    scores = clf.scores("Crown crown, and a horse")  # "horse" and the rest are unseen
    assert scores == {"A": pytest.approx(a), "B": pytest.approx(b)}
    assert clf.predict("crown") == "A"
    assert clf.predict("sword") == "B"


def test_another_smoothing_scores_as_a_classifier_trained_with_it():
    turns = [("A", "crown crown"), ("B", "sword"), ("A", "a horse")]
    reused = WordClassifier(turns, alpha=0.5).with_alpha(2.0)
    assert reused.scores("crown and sword") == WordClassifier(turns, alpha=2.0).scores(
        "crown and sword"
    )
    with pytest.raises(ValueError, match="positive"):
        reused.with_alpha(0.0)


def test_the_speakers_words_name_the_speaker_of_unseen_lines():
    train = [("Margaret", "revenge on York and all his house"), ("Henry", "peace and prayer")]
    train += [("Margaret", "York shall pay"), ("Henry", "pray for peace, good lords")]
    clf = WordClassifier(train, alpha=0.1)
    test = [("Margaret", "Death to York!"), ("Henry", "Let us have peace.")]
    assert clf.accuracy(test) == 1.0


def test_one_speaker_is_not_a_classifier():
    with pytest.raises(ValueError, match="two speakers"):
        WordClassifier([("A", "x"), ("A", "y")], alpha=1.0)
    with pytest.raises(ValueError, match="positive"):
        WordClassifier([("A", "x"), ("B", "y")], alpha=0.0)


def test_alpha_is_chosen_on_training_folds_only():
    # Every speaker has one word of its own plus a shared filler word in each line.
    train = [_d(name, f"{word} filler {i}") for i in range(5) for name, word in
             (("A", "fire"), ("B", "water"), ("C", "earth"))]  # fmt: skip
    alpha = choose_alpha(train)
    assert alpha in ALPHAS
    held_right = [_d("A", "fire"), _d("B", "water"), _d("C", "earth")]
    held_wrong = [_d("A", "water"), _d("B", "earth"), _d("C", "fire")]
    right, wrong = word_speaker_id(train, held_right), word_speaker_id(train, held_wrong)
    assert right["alpha"] == wrong["alpha"] == alpha  # the held-out turns never choose it
    assert (right["hits"], right["turns"], right["accuracy"]) == (3, 3, 1.0)
    assert (wrong["hits"], wrong["accuracy"]) == (0, 0.0)


def test_cross_validation_rejects_a_smoothing_that_drowns_the_voices():
    # So strong a smoothing scores raw counts, not frequencies: A, who says "the" at length,
    # then wins B's short lines on that one shared word.
    train = [_d("A", "the " * 12 + f"fire {i}") for i in range(5)]
    train += [_d("B", f"the water {i}") for i in range(5)]
    turns = [(d.character, d.messages[1][1]) for d in train]
    assert WordClassifier(turns, 1e9).predict("the water") == "A"
    assert WordClassifier(turns, 1.0).predict("the water") == "B"
    assert choose_alpha(train, alphas=(1e9, 1.0)) == 1.0
    assert choose_alpha(train, alphas=(1.0, 1e9)) == 1.0


def test_too_few_dialogues_to_hold_out_fall_back_to_laplace():
    assert choose_alpha([_d("A", "x"), _d("B", "y")]) == 1.0


def test_a_held_out_speaker_without_training_lines_is_an_error():
    train = [_d("A", "x"), _d("B", "y")]
    with pytest.raises(ValueError, match="no training dialogues for C"):
        word_speaker_id(train, [_d("C", "z")])
    with pytest.raises(ValueError, match="no held-out character turns"):
        word_speaker_id(train, [Dialogue("A", [("user", "Anyone?")])])
