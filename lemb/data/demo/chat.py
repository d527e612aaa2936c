"""The demo's `chat` task: facts stated earlier in a conversation."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lemb.data.demo.names import Namer


@dataclass(frozen=True)
class _Slot:
    kind: str
    question: tuple[str, ...]  # {s}: the slot's subject (species, friend, ...)
    gold: tuple[str, ...]  # {s}, {v}
    other: tuple[str, ...]  # the same kind of fact about someone else: {s}, {v}, {o}: other person
    echo: tuple[str, ...]  # the question's words, no answer: {s}


_SLOTS = (
    _Slot(
        "pet",
        ("What was the name of my {s} again?", "What is the name of my {s}?"),
        (
            "User: {v} the {s} chewed my slippers again this morning.",
            "User: we adopted a little {s} last spring and we call her {v}.",
            "User: my {s} {v} loves sleeping on the sofa.",
        ),
        ("User: my {o}'s {s} is named {v}.", "User: the name of my {o}'s {s} is {v}."),
        (
            "User: I am terrible with names, I even forget the name of my {s} sometimes.",
            "User: what food should I give my {s}?",
        ),
    ),
    _Slot(
        "friend_town",
        ("Which town does my friend {s} live in?", "Where does my friend {s} live again?"),
        (
            "User: {s} settled down in {v} after the wedding.",
            "User: {s} has a little house in {v} now, near the market.",
            "User: my friend {s} moved to {v} last year.",
        ),
        ("User: my friend {o} lives in the town of {v}.", "User: my friend {o} lives in {v}, a town by the sea."),
        (
            "User: I should visit my friend {s} soon, it has been ages.",
            "User: my friend {s} asked me where I live now.",
        ),
    ),
    _Slot(
        "boat",
        ("What is the name of my boat?", "What was the name of my boat again?"),
        (
            "User: the little sailing vessel I bought is the {v} now.",
            "User: we sailed the {v} around the bay, she handles the waves well.",
            "User: my boat, the {v}, is moored by the old pier.",
        ),
        ("User: my {o}'s boat is called {v}.", "User: the name of my {o}'s boat is {v}."),
        (
            "User: I can never decide how to name things, like my boat.",
            "User: my boat needs a new name, the old one wore off.",
        ),
    ),
    _Slot(
        "dentist",
        ("What is the name of my dentist?", "What was the name of my dentist again?"),
        (
            "User: Dr. {v} is checking my teeth next Tuesday.",
            "User: I trust Dr. {v} with my teeth, she is very gentle.",
            "User: my dentist, Dr. {v}, wants to see me next week.",
        ),
        ("User: my {o}'s dentist is called Dr. {v}.", "User: the dentist of my {o} is Dr. {v}."),
        ("User: I need to find the name of a good dentist for my {o}.", "User: I hate going to my dentist."),
    ),
    _Slot(
        "landlord",
        ("What is the name of my landlord?", "What was the name of my landlord again?"),
        (
            "User: Mr. {v} still has not fixed the heating in my flat.",
            "User: the man who owns my flat, Mr. {v}, raised the rent again.",
            "User: my landlord, Mr. {v}, raised the rent again.",
        ),
        ("User: my {o}'s landlord is called Mr. {v}.", "User: the name of my {o}'s landlord is Mr. {v}."),
        ("User: my landlord never answers the phone.", "User: I forgot the name of my {o}'s landlord."),
    ),
    _Slot(
        "coach",
        ("What is the name of my football coach?", "What was the name of my football coach again?"),
        (
            "User: Coach {v} made us run laps for the whole practice.",
            "User: at training, Coach {v} shouts at us all the time.",
            "User: my football coach, {v}, made us run laps.",
        ),
        (
            "User: my {o}'s football coach is called {v}.",
            "User: my {o} plays football too, and the coach there is {v}.",
        ),
        (
            "User: my football coach says I should practise more.",
            "User: I want to ask my football coach who picks the team.",
        ),
    ),
)

# which distractor turns a conversation holds, with their weights: the same kind of fact about
# someone else ("other"), a turn that repeats the question's words without the answer ("echo")
CHAT_DISTRACTORS = {(): 0.15, ("other",): 0.45, ("echo",): 0.25, ("other", "echo"): 0.15}
_CREATURES = ("fox", "owl", "hound", "toad", "moth", "hare", "crane", "newt", "lynx", "boar")
_RELATIVES = ("sister", "brother", "neighbour", "cousin", "uncle", "aunt", "colleague")
_FILLERS = (
    "Assistant: That sounds lovely, tell me more.",
    "Assistant: Good to know, I will keep that in mind.",
    "User: the weather has been awful all week.",
    "User: I started reading a long novel about sailors.",
    "Assistant: Happy to help with anything else you need.",
    "User: work has been busy since the new manager arrived.",
    "Assistant: Sounds like a busy week.",
    "User: I baked bread for the first time yesterday.",
)


def _slot_subject(slot: _Slot, namer: Namer) -> str:
    if slot.kind == "pet":
        return namer.word(1, suffix=namer.rng.choice(_CREATURES))
    if slot.kind == "friend_town":
        return namer.name(2)
    return ""


def _slot_value(slot: _Slot, namer: Namer) -> str:
    return namer.name(2)


def make_chat(rng: random.Random, namer: Namer, n: tuple[int, int]) -> list[list[dict]]:
    splits: list[list[dict]] = []
    for n_queries in n:
        queries = []
        for _ in range(n_queries):
            slot = rng.choice(_SLOTS)
            s = _slot_subject(slot, namer)
            v = _slot_value(slot, namer)
            turns = [rng.choice(slot.gold).format(s=s, v=v)]
            gold_turn = turns[0]
            relatives = rng.sample(_RELATIVES, 2)
            other = namer.name(2) if slot.kind == "friend_town" else relatives[0]
            mix = rng.choices(list(CHAT_DISTRACTORS), weights=list(CHAT_DISTRACTORS.values()))[0]
            if "other" in mix:
                turns.append(rng.choice(slot.other).format(s=s, v=_slot_value(slot, namer), o=other))
            if "echo" in mix:
                turns.append(rng.choice(slot.echo).format(s=s, o=relatives[1]))
            length = rng.randint(6, 8)
            others = [x for x in _SLOTS if x is not slot]
            for o in rng.sample(others, rng.randint(2, 3)):
                turns.append(rng.choice(o.gold).format(s=_slot_subject(o, namer), v=_slot_value(o, namer)))
            turns.extend(rng.sample(_FILLERS, max(1, length - len(turns))))
            rng.shuffle(turns)
            queries.append(
                {
                    "text": rng.choice(slot.question).format(s=s),
                    "target": v,
                    "history": turns,
                    "relevance": None,
                    "gold_index": turns.index(gold_turn),
                }
            )
        splits.append(queries)
    return splits
