"""The demo's `tool` task: fictional APIs of fictional realms."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lemb.data.demo.names import Namer, make_country


@dataclass(frozen=True)
class _Concept:
    tool: str  # namespace.verb; the name is the realm's stem + these words in CamelCase
    description: str  # {r}: realm name; in other words than the requests
    requests: tuple[str, ...]  # {r}: realm, {p}, {q}: towns
    near_tool: str  # a tool that shares the requests' words but does something else
    near_description: str


_CONCEPTS = (
    _Concept(
        "tide.forecast",
        "predicts when the water rises and falls at a port of {r}.",
        (
            "When will the water be high and low at {p} harbor in {r}?",
            "At what time is high water in the harbor of {p}, {r}?",
        ),
        "harbor.alerts",
        "sends a message when the water in a harbor of {r} gets too high or too low.",
    ),
    _Concept(
        "rail.fare",
        "tells the fare of a ride between two stations of {r}.",
        (
            "How much does a train ticket from {p} to {q} cost in {r}?",
            "What is the price of a train ticket from {p} to {q} in {r}?",
        ),
        "ticket.book",
        "buys a train ticket between two towns of {r}.",
    ),
    _Concept(
        "sky.outlook",
        "predicts the sky over a town of {r} for the next days: sun, clouds or rain.",
        ("Fetch tomorrow's weather forecast for {p}, {r}.", "Will it be sunny tomorrow in {p}, {r}?"),
        "weather.alerts",
        "sends a warning when it will be too sunny or too stormy tomorrow in a town of {r}.",
    ),
    _Concept(
        "dine.reserve",
        "reserves a table for a meal at an eatery of {r}.",
        (
            "Book me a table at a restaurant in {p}, {r}.",
            "Can you reserve a table for dinner at a restaurant in {p}, {r}?",
        ),
        "restaurant.reviews",
        "shows what guests wrote about the food of a restaurant in {r}.",
    ),
    _Concept(
        "census.count",
        "gives the number of inhabitants recorded for a settlement of {r}.",
        ("How many people live in {p}, {r}?", "What is the population of {p} in {r}?"),
        "people.search",
        "looks up where a person lives in {r} and how many people share the name.",
    ),
    _Concept(
        "gallery.hours",
        "lists when the doors of an exhibition hall of {r} open and close.",
        ("What time does the museum in {p}, {r} open?", "When does the museum of {p} in {r} open today?"),
        "museum.tickets",
        "sells tickets for a museum in {r} for the time it opens today.",
    ),
    _Concept(
        "clinic.book",
        "schedules a visit with a physician at a health centre of {r}.",
        (
            "I need an appointment with a doctor in {p}, {r}.",
            "Get me an appointment with a doctor in {p}, {r} this week.",
        ),
        "doctor.reviews",
        "shows what patients say about a doctor in {r} after an appointment.",
    ),
    _Concept(
        "air.status",
        "reports whether a plane leaving an airfield of {r} is late.",
        ("Is my flight from {p} in {r} delayed?", "Is the flight from {p}, {r} to {q} late today?"),
        "flight.search",
        "finds a cheap flight from {r} to another country.",
    ),
    _Concept(
        "post.trace",
        "shows where a package sent with the mail service of {r} is right now.",
        ("Where is the parcel I sent to {p} in {r}?", "Track the parcel I sent from {p} to {q} in {r}."),
        "parcel.send",
        "sends a parcel to an address in {r}.",
    ),
    _Concept(
        "road.measure",
        "tells how many kilometres it is from one town of {r} to another by road.",
        ("How far is it from {p} to {q} in {r}?", "What is the distance from {p} to {q} in {r}?"),
        "travel.guide",
        "suggests what to see when you travel from one town of {r} to another.",
    ),
    _Concept(
        "lodging.vacancy",
        "finds inns in a town of {r} with a free room for the night.",
        (
            "Is there a hotel room available in {p}, {r} tonight?",
            "Find me an available hotel room in {p}, {r} for tonight.",
        ),
        "hotel.prices",
        "compares the prices of the hotel rooms available in {r}.",
    ),
    _Concept(
        "coin.convert",
        "tells what an amount of dollars or other foreign cash is worth in the coins of {r}.",
        ("How much is 50 dollars worth in the money of {r}?", "Change 100 dollars into the money used in {r}."),
        "money.transfer",
        "sends money from your account to someone in {r}.",
    ),
)


TOOL_EXTRA_REALMS = 2  # realms beyond those the queries need: their tools are distractors too


def _tool_name(stem: str, tool: str) -> str:
    """ "zorb", "tide.forecast" -> "ZorbTideForecast" (the small LLM copies CamelCase names far more
    reliably than zorb_tide.forecast: 31 of 32 against 25 of 32 requests, SmolLM2-135M)."""
    return stem.capitalize() + "".join(w.capitalize() for w in tool.split("."))


def make_tool(rng: random.Random, namer: Namer, n: tuple[int, int]) -> tuple[list[str], list[list[dict]]]:
    key_texts: list[str] = []
    splits: list[list[dict]] = []
    for n_queries in n:
        n_realms = -(-n_queries // len(_CONCEPTS)) + TOOL_EXTRA_REALMS
        realms = [make_country(namer) for _ in range(n_realms)]
        pairs = [(r, c) for r in realms for c in _CONCEPTS]
        for (stem, realm), c in pairs:
            key_texts.append(f"The tool {_tool_name(stem, c.near_tool)} " + c.near_description.format(r=realm))
        asked = rng.sample(pairs, n_queries)
        asked_set = set(asked)
        queries = []
        for (stem, realm), c in pairs:
            text = f"The tool {_tool_name(stem, c.tool)} " + c.description.format(r=realm)
            key_texts.append(text)
            if ((stem, realm), c) in asked_set:
                p, q = namer.name(2), namer.name(2)
                queries.append(
                    {
                        "text": rng.choice(c.requests).format(r=realm, p=p, q=q),
                        "target": _tool_name(stem, c.tool),
                        "positive_texts": [text],
                    }
                )
        rng.shuffle(queries)
        splits.append(queries)
    return key_texts, splits
