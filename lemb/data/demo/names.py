"""Fictional names for the demo world: syllable-built words, never repeated within one world."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n"]
_ONSETS += ["p", "pl", "r", "s", "sk", "st", "t", "tr", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
_CODAS = ["", "", "", "n", "r", "l", "m", "k", "x", "sh"]


@dataclass
class Namer:
    """Syllable-built names, never repeated within one world."""

    rng: random.Random
    used: set[str] = field(default_factory=set)

    def _syllable(self, coda: bool) -> str:
        s = self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)
        return s + self.rng.choice(_CODAS) if coda else s

    def word(self, syllables: int = 2, suffix: str = "") -> str:
        """A new lowercase word, not used before in this world."""
        while True:
            parts = [self._syllable(coda=(i == syllables - 1)) for i in range(syllables)]
            w = "".join(parts) + suffix
            stutter = any(a[:2] == b[:2] for a, b in zip(parts, parts[1:]))  # "Pleplek" is hard to copy
            if 4 <= len(w) <= 10 and w not in self.used and not stutter:
                self.used.add(w)
                return w

    def name(self, syllables: int = 2, suffix: str = "") -> str:
        return self.word(syllables, suffix).capitalize()


_COUNTRY_SUFFIXES = ("ia", "ora", "eth", "ovia")


def make_country(namer: Namer) -> tuple[str, str]:
    """(stem, country name): "zorb", "Zorbia"."""
    while True:
        stem = namer.word(2)
        country = stem.capitalize() + namer.rng.choice(_COUNTRY_SUFFIXES)
        if country.lower() not in namer.used:
            namer.used.add(country.lower())
            return stem, country
