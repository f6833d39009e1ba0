"""A generated review-sentiment task that word order decides and a bag of words cannot.

Each review has two clauses joined by a connective, each about an aspect and
each with its own polarity, optionally negated, and often with a relative
clause wedged between the aspect and its verb:

    the soup , which we ordered on a rainy friday with friends , was not great
    but the staff was lovely

The label is the sentiment of the *first* clause: its adjective's polarity,
flipped by `not`/`never`. The second clause is independent noise with the same
vocabulary, so a bag of words sees the same words whichever clause carries the
negation or the positive adjective; it can only guess when the two clauses
differ. Getting it right needs word order (which clause comes first, what the
negation attaches to) across gaps of up to a dozen words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

ASPECTS = [
    "food",
    "soup",
    "pasta",
    "dessert",
    "coffee",
    "wine",
    "service",
    "staff",
    "waiter",
    "music",
    "room",
    "bed",
    "view",
    "location",
    "price",
    "movie",
    "plot",
    "acting",
    "ending",
    "soundtrack",
    "camera",
    "battery",
    "screen",
    "keyboard",
]
POSITIVE = [
    "good",
    "great",
    "excellent",
    "superb",
    "lovely",
    "delightful",
    "wonderful",
    "fantastic",
    "pleasant",
    "amazing",
    "outstanding",
    "perfect",
]
NEGATIVE = [
    "bad",
    "awful",
    "terrible",
    "poor",
    "bland",
    "dreadful",
    "horrible",
    "mediocre",
    "disappointing",
    "weak",
    "boring",
    "rude",
]
NEGATIONS = ("not", "never")
INTENSIFIERS = ("really", "truly", "quite", "very", "rather")
CONNECTIVES = ("but", "and", "while", "although", "whereas", "yet")
SUBJECTS = ("we", "they", "i", "my friends", "the kids")
VERBS = ("ordered", "tried", "saw", "booked", "bought", "tested", "enjoyed")
TIMES = (
    "on a rainy friday",
    "last week",
    "after work",
    "on a quiet monday evening",
    "at lunch",
    "during the holidays",
    "on our anniversary",
    "late at night",
    "with friends",
    "with the whole family",
    "near the station",
    "in the old town",
)
LABELS = ("negative", "positive")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]")


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def _clause(rng: random.Random) -> tuple[str, int]:
    aspect = rng.choice(ASPECTS)
    positive = rng.random() < 0.5
    negated = rng.random() < 0.5
    words = ["the", aspect]
    if rng.random() < 0.6:
        pronoun = "which" if rng.random() < 0.5 else "that"
        filler = [pronoun, rng.choice(SUBJECTS), rng.choice(VERBS)]
        for _ in range(rng.randint(1, 2)):
            filler.append(rng.choice(TIMES))
        words += [",", *filler, ","]
    words.append("was")
    if negated:
        words.append(rng.choice(NEGATIONS))
    if rng.random() < 0.4:
        words.append(rng.choice(INTENSIFIERS))
    words.append(rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words), int(positive != negated)


def generate(count: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        first, label = _clause(rng)
        second, _ = _clause(rng)
        examples.append(Example(f"{first} {rng.choice(CONNECTIVES)} {second}", label))
    return examples


@dataclass(frozen=True)
class TextSplit:
    train: list[Example]
    test: list[Example]


def load_split(train_size: int = 24_000, test_size: int = 4_000) -> TextSplit:
    """Training and held-out sets from different seeds; held-out texts never seen in training."""
    train = generate(train_size, seed=1)
    seen = {example.text for example in train}
    test = [example for example in generate(test_size * 2, seed=2) if example.text not in seen]
    return TextSplit(train, test[:test_size])


def vocabulary() -> list[str]:
    words: set[str] = {",", "the", "was", "which", "that"}
    for group in (ASPECTS, POSITIVE, NEGATIVE, NEGATIONS, INTENSIFIERS, CONNECTIVES, VERBS):
        words.update(group)
    for phrase in (*SUBJECTS, *TIMES):
        words.update(phrase.split())
    return [*SPECIAL, *sorted(words)]


def build_tokenizer(path: Path) -> None:
    """Write a tokenizer.json (fast `tokenizers` format): word level, lowercased, [CLS] first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {word: index for index, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", special_tokens=[("[CLS]", vocab["[CLS]"])]
    )
    tokenizer.save(str(path))
