"""The demo's `qa` task: facts about fictional countries."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lemb.data.demo.names import Namer, make_country


@dataclass(frozen=True)
class _Attribute:
    name: str
    questions: tuple[str, ...]  # {e}: the country
    gold: tuple[str, ...]  # the fact in other words than the questions; {e}, {v}
    plain: tuple[str, ...]  # the fact in the questions' words (facts nobody asks about)
    topic: str  # the question's words, for echo keys; {e}


_ATTRIBUTES = (
    _Attribute(
        "capital",
        ("What is the capital of {e}?", "Which city is the capital of {e}?"),
        ("The seat of government of {e} is the city of {v}.", "The parliament of {e} meets in the city of {v}."),
        ("The capital of {e} is {v}.", "{v} is the capital city of {e}."),
        "the capital of {e}",
    ),
    _Attribute(
        "founder",
        ("Who founded {e}?", "Who was the founder of {e}?"),
        ("The first settlers of {e} were led by {v}.", "The explorer {v} led the first settlers to {e}."),
        ("The founder of {e} was {v}.", "{e} was founded by {v}."),
        "who founded {e}",
    ),
    _Attribute(
        "mountain",
        ("What is the highest mountain in {e}?", "Which is the tallest mountain of {e}?"),
        ("The tallest peak of {e} is Mount {v}.", "Climbers come to {e} to reach the summit of Mount {v}."),
        ("The highest mountain in {e} is Mount {v}.", "Mount {v} is the highest mountain of {e}."),
        "the highest mountain in {e}",
    ),
    _Attribute(
        "lake",
        ("What is the largest lake in {e}?", "Which lake is the largest in {e}?"),
        (
            "The biggest body of fresh water in {e} is Lake {v}.",
            "Fishermen of {e} sail across the wide waters of Lake {v}.",
        ),
        ("The largest lake in {e} is Lake {v}.", "Lake {v} is the largest lake of {e}."),
        "the largest lake in {e}",
    ),
    _Attribute(
        "river",
        ("Which river flows through {e}?", "What is the main river of {e}?"),
        (
            "The waters of the {v} cross {e} from the hills to the sea.",
            "Boats in {e} carry goods along the {v} river.",
        ),
        ("The main river of {e} is the {v}.", "The {v} river flows through {e}."),
        "which river flows through {e}",
    ),
    _Attribute(
        "currency",
        ("What currency is used in {e}?", "What is the currency of {e}?"),
        ("People in {e} pay with the {v}.", "The money of {e} is the {v}."),
        ("The currency of {e} is the {v}.", "The {v} is the currency used in {e}."),
        "the currency used in {e}",
    ),
)

_ECHOES = (
    "Travellers to {e} often ask about {t}; the guidebooks disagree.",
    "A quiz show once asked its players about {t}, and nobody knew.",
    "Schoolchildren in {e} argue about {t} every year.",
    "The old maps say nothing certain about {t}.",
)

QA_PER_COUNTRY = 2  # questions asked about each country
PLAIN_PER_ATTRIBUTE = 2  # facts nobody asks about stated in the questions' words, per attribute and split
QA_ECHO_SHARE = 0.7  # share of the asked facts with an echo key


def make_qa(rng: random.Random, namer: Namer, n: tuple[int, int]) -> tuple[list[str], list[list[dict]]]:
    """(key texts, [train queries, held-out queries]); a query's gold key is in `positive_texts`."""
    key_texts: list[str] = []
    splits: list[list[dict]] = []
    for n_queries in n:
        n_entities = -(-n_queries // QA_PER_COUNTRY)
        entities = [make_country(namer)[1] for _ in range(n_entities)]
        facts = {(e, a.name): namer.name(2) for e in entities for a in _ATTRIBUTES}
        asked = []
        for e in entities:
            for a in rng.sample(_ATTRIBUTES, QA_PER_COUNTRY):
                asked.append((e, a))
        asked = asked[:n_queries]
        asked_set = {(e, a.name) for e, a in asked}
        for a in _ATTRIBUTES:
            unasked = [e for e in entities if (e, a.name) not in asked_set]
            plain = set(rng.sample(unasked, min(PLAIN_PER_ATTRIBUTE, len(unasked))))
            for e in unasked:
                templates = a.plain if e in plain else a.gold
                key_texts.append(rng.choice(templates).format(e=e, v=facts[e, a.name]))
        queries = []
        for e, a in asked:
            v = facts[e, a.name]
            gold = rng.choice(a.gold).format(e=e, v=v)
            key_texts.append(gold)
            if rng.random() < QA_ECHO_SHARE:
                key_texts.append(rng.choice(_ECHOES).format(e=e, t=a.topic.format(e=e)))
            queries.append({"text": rng.choice(a.questions).format(e=e), "target": v, "positive_texts": [gold]})
        splits.append(queries)
    return key_texts, splits
