"""Vocabularies collected from the real validation files (see BUILD_NOTES in the data notes).

ProsQA (``prosqa/valid.json``): 17 person names and 38 made-up concept words.
ProntoQA (``prontoqa/valid.json``): 9 person names, 17 concept words and the 45 properties in the 13 property
families of the ProntoQA generator (Saparov & He, 2023); a ProntoQA question uses each family at most once.
"""
from __future__ import annotations

PROSQA_NAMES: tuple[str, ...] = (
    "Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver", "Polly", "Rex", "Sally",
    "Sam", "Stella", "Tom", "Wren",
)

PROSQA_CONCEPTS: tuple[str, ...] = (
    "bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus", "gerpus", "gorpus", "grimpus",
    "gwompus", "hilpus", "impus", "jelpus", "jompus", "kerpus", "lempus", "lorpus", "numpus", "quimpus", "rempus",
    "rompus", "rorpus", "scrompus", "shumpus", "sterpus", "storpus", "terpus", "timpus", "tumpus", "vumpus",
    "worpus", "wumpus", "yerpus", "yimpus", "yumpus", "zhorpus", "zumpus",
)

PRONTOQA_NAMES: tuple[str, ...] = ("Alex", "Fae", "Max", "Polly", "Rex", "Sally", "Sam", "Stella", "Wren")

PRONTOQA_CONCEPTS: tuple[str, ...] = (
    "brimpus", "dumpus", "gorpus", "grimpus", "impus", "jompus", "lempus", "lorpus", "numpus", "rompus",
    "shumpus", "sterpus", "tumpus", "vumpus", "wumpus", "yumpus", "zumpus",
)

PRONTOQA_PROPERTY_FAMILIES: tuple[tuple[str, ...], ...] = (
    ("blue", "red", "brown", "orange"),
    ("small", "large"),
    ("metallic", "wooden", "luminous", "liquid"),
    ("transparent", "opaque"),
    ("nervous", "happy", "feisty", "shy"),
    ("bright", "dull"),
    ("sweet", "sour", "spicy", "bitter"),
    ("floral", "fruity", "earthy"),
    ("hot", "cold", "temperate"),
    ("kind", "mean", "angry", "amenable", "aggressive"),
    ("melodic", "muffled", "discordant", "loud"),
    ("slow", "moderate", "fast"),
    ("windy", "sunny", "overcast", "rainy", "snowy"),
)


def plural(concept: str) -> str:
    """``"tumpus"`` -> ``"tumpuses"`` (all concept words end in ``-us``)."""
    return concept + "es"


def article(word: str) -> str:
    """ProntoQA's indefinite article (``an impus``); ProsQA always writes ``a``."""
    return "an" if word[0] in "aeiou" else "a"
