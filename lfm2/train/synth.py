"""Chat and tool-use conversations that our own code generates, for the bundled model's SFT.

A tiny model cannot memorise the world, but it can learn the *format*: answer a greeting,
copy a fact from a small table, do small arithmetic, and, above all, call tools the way LFM2
does: read the tool list in the system turn, pick the tool whose description matches the
request, copy argument values from the user's words, then answer from the tool's result.

To measure generalisation rather than memory, every tool is built from parts (an action, a
subject, parameters) and the parts are split: `split="train"` and `split="heldout"` draw from
disjoint sets of tool names and of request phrasings, so held-out prompts use tools and
wordings the model has never seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Seoul", "Toronto",
          "Sydney", "Nairobi", "Mumbai", "Dublin", "Vienna", "Lisbon", "Prague", "Athens", "Boston", "Denver",
          "Chicago", "Miami", "Quito", "Dakar", "Hanoi", "Manila", "Zurich", "Helsinki", "Warsaw"]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome",
            "Egypt": "Cairo", "Peru": "Lima", "Norway": "Oslo", "Kenya": "Nairobi", "Ireland": "Dublin",
            "Austria": "Vienna", "Portugal": "Lisbon", "Greece": "Athens", "Poland": "Warsaw", "Finland": "Helsinki"}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
          "a tomato": "red", "an orange": "orange", "a plum": "purple"}
UNITS = [("km", "miles"), ("miles", "km"), ("kg", "pounds"), ("pounds", "kg"), ("celsius", "fahrenheit"),
         ("liters", "gallons"), ("meters", "feet"), ("feet", "meters")]
NAMES = ["Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    kind: str  # how values are drawn: city, number, unit_from, unit_to, name, day, time, word, symbol
    type: str = "string"


@dataclass(frozen=True)
class ToolKind:
    """A family of tools: one action on one subject, with its parameters and request phrasings."""

    name: str
    description: str
    params: tuple[Param, ...]
    asks: tuple[str, ...]  # request templates; {param} fields are filled with the call's values
    result: str  # template of the tool's result
    answer: str  # template of the final answer, from the result


CITY = Param("city", "The city name", "city")
TOOLS_TRAIN = [
    ToolKind("get_weather", "Get the current weather in a city", (CITY,),
             ("What's the weather in {city}?", "Is it raining in {city} right now?", "How warm is it in {city}?"),
             '{{"temperature": {n}, "condition": "{cond}"}}', "It is {cond} and {n} degrees in {city}."),
    ToolKind("get_time", "Get the current local time in a city", (CITY,),
             ("What time is it in {city}?", "Tell me the local time in {city}.", "Current time in {city}?"),
             '{{"time": "{hh}:{mm}"}}', "It is {hh}:{mm} in {city}."),
    ToolKind("convert_units", "Convert a value from one unit to another",
             (Param("value", "The amount to convert", "number", "number"), Param("from_unit", "Unit of the value",
              "unit_from"), Param("to_unit", "Unit to convert to", "unit_to")),
             ("Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} is {value} {from_unit}?"),
             '{{"result": {n}}}', "{value} {from_unit} is {n} {to_unit}."),
    ToolKind("calculate", "Evaluate an arithmetic expression",
             (Param("expression", "The expression, e.g. 2 + 3 * 4", "expression"),),
             ("Calculate {expression}.", "What is {expression}? Use the calculator."),
             '{{"value": {n}}}', "The result is {n}."),
    ToolKind("create_event", "Add an event to the calendar",
             (Param("title", "Event title", "word"), Param("day", "Day of the week", "day"),
              Param("time", "Start time, HH:MM", "time")),
             ("Schedule {title} on {day} at {time}.", "Add {title} to my calendar for {day} at {time}."),
             '{{"status": "created", "id": {n}}}', "Done: {title} is on your calendar for {day} at {time}."),
    ToolKind("send_message", "Send a text message to a contact",
             (Param("to", "Contact name", "name"), Param("text", "Message text", "word")),
             ("Text {to} saying {text}.", "Send {to} a message: {text}."),
             '{{"delivered": true}}', "Your message to {to} was sent."),
]
TOOLS_HELDOUT = [
    ToolKind("get_air_quality", "Get the air quality index of a city", (CITY,),
             ("How clean is the air in {city} today?", "Air quality for {city}, please."),
             '{{"aqi": {n}}}', "The air quality index in {city} is {n}."),
    ToolKind("get_population", "Look up the population of a city", (CITY,),
             ("How many people live in {city}?", "Population of {city}?"),
             '{{"population": {n}}}', "{city} has about {n} inhabitants."),
    ToolKind("set_alarm", "Set an alarm clock",
             (Param("time", "Alarm time, HH:MM", "time"), Param("day", "Day of the week", "day")),
             ("Wake me up at {time} on {day}.", "I need an alarm for {time} on {day}."),
             '{{"ok": true}}', "Your alarm is set for {time} on {day}."),
    ToolKind("call_contact", "Start a phone call with a contact", (Param("name", "Contact name", "name"),),
             ("Phone {name} for me.", "Could you ring {name}?"),
             '{{"calling": true}}', "Calling {name} now."),
    ToolKind("translate_word", "Translate an English word into French", (Param("word", "The word", "word"),),
             ("What is {word} in French?", "Give me the French for {word}."),
             '{{"translation": "{word}e"}}', "In French, {word} is {word}e."),
]
WORDS = ["lunch", "gym", "meeting", "dentist", "hello", "thanks", "book", "party", "review", "music", "tea", "walk"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]

GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"), ("Hi", "Hi! What can I do for you?"),
    ("Good morning", "Good morning! How can I help?"), ("How are you?", "I'm doing well, thank you. How can I help?"),
    ("Thanks!", "You're welcome!"), ("Who are you?", "I am a small assistant built with lfm2."),
    ("Bye", "Goodbye! Have a nice day."), ("What can you do?", "I can chat, answer simple questions and use tools."),
]


def _value(p: Param, rng: random.Random, units: tuple[str, str]) -> Any:
    if p.kind == "city":
        return rng.choice(CITIES)
    if p.kind == "number":
        return rng.randint(1, 500)
    if p.kind == "unit_from":
        return units[0]
    if p.kind == "unit_to":
        return units[1]
    if p.kind == "name":
        return rng.choice(NAMES)
    if p.kind == "day":
        return rng.choice(DAYS)
    if p.kind == "time":
        return f"{rng.randint(6, 21):02d}:{rng.choice(['00', '15', '30', '45'])}"
    if p.kind == "expression":
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        return f"{a} + {b} * {c}"
    return rng.choice(WORDS)


def schema(kind: ToolKind) -> dict[str, Any]:
    """The tool in OpenAI's JSON-schema shape, as it is listed in the system turn."""
    return {"type": "function", "function": {
        "name": kind.name, "description": kind.description,
        "parameters": {"type": "object", "properties": {p.name: {"type": p.type, "description": p.description}
                                                         for p in kind.params},
                       "required": [p.name for p in kind.params]}}}


def tool_conversation(rng: random.Random, split: str = "train") -> dict[str, Any]:
    """A conversation: tools listed, a request, the call, its result, and the final answer.

    The offered tools are the right one plus up to three distractors from the same split, in a
    random order, so the model must choose by reading the list.
    """
    pool = TOOLS_TRAIN if split == "train" else TOOLS_HELDOUT
    kind = rng.choice(pool)
    offered = [kind, *rng.sample([k for k in pool if k is not kind], k=min(rng.randint(0, 3), len(pool) - 1))]
    rng.shuffle(offered)
    units = rng.choice(UNITS)
    args = {p.name: _value(p, rng, units) for p in kind.params}
    fill = {**args, "n": rng.randint(1, 999), "cond": rng.choice(CONDITIONS), "hh": f"{rng.randint(0, 23):02d}",
            "mm": f"{rng.randint(0, 59):02d}"}
    if kind.name == "calculate":
        fill["n"] = eval_expression(args["expression"])
    ask = rng.choice(kind.asks).format(**fill)
    call = {"id": f"call_{rng.randrange(16**8):08x}", "type": "function",
            "function": {"name": kind.name, "arguments": json.dumps(args)}}
    messages = [{"role": "user", "content": ask},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": kind.result.format(**fill)},
                {"role": "assistant", "content": kind.answer.format(**fill)}]
    return {"messages": messages, "tools": [schema(k) for k in offered], "expected": {"name": kind.name,
                                                                                      "arguments": args}}


def eval_expression(expr: str) -> int:
    """`a + b * c` with the precedence a calculator applies (no eval)."""
    a, rest = expr.split(" + ")
    b, c = rest.split(" * ")
    return int(a) + int(b) * int(c)


def chat_conversation(rng: random.Random) -> dict[str, Any]:
    """A short exchange without tools: greeting, a fact from a table, or small arithmetic."""
    kind = rng.randrange(4)
    if kind == 0:
        q, a = rng.choice(GREETINGS)
    elif kind == 1:
        country, city = rng.choice(list(CAPITALS.items()))
        q = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?"]).format(c=country)
        a = f"The capital of {country} is {city}."
    elif kind == 2:
        thing, color = rng.choice(list(COLORS.items()))
        q, a = f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is {color}."
    else:
        x, y = rng.randint(1, 50), rng.randint(1, 50)
        op = rng.choice(["+", "-"])
        q = f"What is {x} {op} {y}?"
        a = f"{x} {op} {y} = {x + y if op == '+' else x - y}."
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return {"messages": messages}


def conversations(n: int, seed: int, split: str = "train", tool_fraction: float = 0.6) -> list[dict[str, Any]]:
    """`n` conversations, a `tool_fraction` of them with tools; deterministic in `seed`."""
    rng = random.Random(seed)
    return [tool_conversation(rng, split) if rng.random() < tool_fraction else chat_conversation(rng)
            for _ in range(n)]
