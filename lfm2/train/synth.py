"""Chat and tool-use conversations that our own code generates, for the bundled model's SFT.

A tiny model cannot memorise the world, but it can learn the *format*: answer a greeting,
copy a fact from a small table, do small arithmetic, and, above all, call tools the way LFM2
does: read the tool list in the system turn, pick the tool whose description matches the
request, copy argument values from the user's words, then answer from the tool's result.

Tools are built from parts so that no small set of names can be memorised: a lookup tool is a
verb and a subject ("get" + "humidity" -> `get_humidity`), an action tool a verb and an object
(`book_table`), and each takes one to three arguments of a few kinds (a city, a day, a time, a
person, a number, a topic) whose parameter names vary from tool to tool. Half the training
tools have made-up subjects or objects (`get_velmorpim`), a third of their parameters made-up
names, half their city, person and topic values are made-up words, and `Variety.made_up_verbs` (used
for the bundled model's fine-tuning data) gives some tools made-up verbs too: no amount of memorising
predicts those, only copying them (from the tool list, from the request) lowers the loss, and
copying is what calling an unseen tool takes. The made-up words are syllable strings by default;
`Variety.words` (a `vocabulary` of the corpus) draws them from real words instead, so that what the
model learns to copy is any word, not a closed set of syllable tokens; `Variety.rich_wording` words the
requests, descriptions and arguments in many more ways. To measure
generalisation rather than memory, `split="heldout"` draws from subjects, objects, tool
descriptions and request phrasings that `split="train"` never uses.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Seoul", "Toronto",
          "Sydney", "Nairobi", "Mumbai", "Dublin", "Vienna", "Lisbon", "Prague", "Athens", "Boston", "Denver",
          "Chicago", "Miami", "Quito", "Dakar", "Hanoi", "Manila", "Zurich", "Helsinki", "Warsaw", "Austin",
          "Geneva", "Milan", "Munich", "Osaka", "Delhi", "Lagos", "Accra", "Havana", "Bogota"]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome",
            "Egypt": "Cairo", "Peru": "Lima", "Norway": "Oslo", "Kenya": "Nairobi", "Ireland": "Dublin",
            "Austria": "Vienna", "Portugal": "Lisbon", "Greece": "Athens", "Poland": "Warsaw", "Finland": "Helsinki"}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
          "a tomato": "red", "an orange": "orange", "a plum": "purple"}
UNITS = [("km", "miles"), ("miles", "km"), ("kg", "pounds"), ("pounds", "kg"), ("celsius", "fahrenheit"),
         ("liters", "gallons"), ("meters", "feet"), ("feet", "meters")]
NAMES = ["Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Maya", "Nils", "Omar", "Priya", "Rosa", "Sam", "Tariq", "Vera"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["lunch", "gym", "meeting", "dentist", "hello", "thanks", "book", "party", "review", "music", "tea", "walk",
         "budget", "garden", "holiday", "report", "dinner", "soccer", "piano", "coffee", "launch", "yoga"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]
VERBS_LOOKUP = ["get", "check", "find", "lookup", "fetch", "show", "read", "query"]
# Made-up words, for training subjects and objects that no amount of memorising can predict: the
# only way to get their tool names and arguments right is to copy them from the tool list.
SYLLABLES = ["zor", "bla", "qui", "mef", "tok", "ran", "vel", "pim", "dax", "lur", "gno", "fep", "wib", "sul",
             "kra", "nob", "tas", "mor", "pel", "vin", "dro", "hak", "lem", "sot"]
SLOT_SETS = ["city", "city day", "person", "person time", "topic", "number city", "day time", "city time",
             "person day", "topic day time", "number", "person topic"]
MADE_UP_FRACTION = 0.5  # of training tools
MADE_UP_PARAM_FRACTION = 0.3  # of training parameter names
MADE_UP_VALUE_FRACTION = 0.5  # of training cities, people and topics


@dataclass(frozen=True)
class Slot:
    """A kind of argument: the parameter names a tool may give it, and how requests mention it.

    `phrases` are keyed by split, so held-out requests also word their arguments differently."""

    kind: str
    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    value: Callable[[random.Random], Any]
    phrases: dict[str, tuple[str, ...]]
    type: str = "string"


def _time(rng: random.Random) -> str:
    return f"{rng.randint(6, 21):02d}:{rng.choice(['00', '15', '30', '45'])}"


SLOTS = {s.kind: s for s in [
    Slot("city", ("city", "location", "place", "town", "where"), ("The city name", "City to look at", "Which city"),
         lambda r: r.choice(CITIES), {"train": ("in {v}", "for {v}"), "heldout": ("around {v}", "over in {v}")}),
    Slot("day", ("day", "weekday", "when", "date"), ("Day of the week", "Which day"), lambda r: r.choice(DAYS),
         {"train": ("on {v}", "for {v}"), "heldout": ("this {v}", "next {v}")}),
    Slot("time", ("time", "hour", "at", "start"), ("Time, HH:MM", "Clock time (24h)"), _time,
         {"train": ("at {v}",), "heldout": ("by {v}", "around {v}")}),
    Slot("person", ("name", "contact", "person", "to", "recipient", "who"), ("Contact name", "The person"),
         lambda r: r.choice(NAMES), {"train": ("for {v}", "with {v}", "to {v}"), "heldout": ("of {v}", "from {v}")}),
    Slot("number", ("amount", "value", "count", "quantity", "number", "n"), ("How many", "The amount"),
         lambda r: r.randint(1, 500),
         {"train": ("of {v}", "worth {v}"), "heldout": ("totaling {v}", "amounting to {v}")}, "number"),
    Slot("topic", ("topic", "query", "subject", "text", "title", "word"), ("What it is about", "Free text"),
         lambda r: r.choice(WORDS), {"train": ("about {v}", "called {v}"), "heldout": ("regarding {v}",
                                                                                    "named {v}")}),
]}

# Lookup subjects: (subject, argument kinds). The held-out subjects never appear in training.
LOOKUPS_TRAIN = [
    ("weather", "city"), ("local time", "city"), ("wind speed", "city"), ("rainfall", "city day"),
    ("sunrise time", "city day"), ("sunset time", "city day"), ("tide level", "city"), ("uv index", "city"),
    ("traffic", "city time"), ("parking price", "city"), ("hotel price", "city day"), ("fuel price", "city"),
    ("crime rate", "city"), ("snow depth", "city"), ("water temperature", "city"), ("noise level", "city"),
    ("bus schedule", "city day"), ("museum hours", "city day"), ("flight delays", "city"), ("taxi fare", "city"),
    ("currency", "city"), ("mayor", "city"), ("elevation", "city"), ("timezone", "city"), ("news", "city topic"),
    ("restaurants", "city"), ("pharmacies", "city"), ("beaches", "city"), ("visibility", "city"),
    ("storm warnings", "city day"), ("electricity price", "city"), ("ski conditions", "city day"),
    ("phone number", "person"), ("email address", "person"), ("birthday", "person"), ("job title", "person"),
    ("office number", "person"), ("shoe size", "person"), ("calendar", "person day"), ("manager", "person"),
    ("definition", "topic"), ("synonym", "topic"), ("spelling", "topic"), ("rhyme", "topic"),
    ("stock price", "topic"), ("song lyrics", "topic"), ("recipe", "topic"), ("movie rating", "topic"),
    ("bank balance", "person"), ("step count", "person day"), ("exchange rate", "number city"),
    ("shipping cost", "number city"), ("train schedule", "city time"), ("event list", "city day"),
]
LOOKUPS_HELDOUT = [
    ("humidity", "city"), ("air quality", "city"), ("population", "city"), ("pollen count", "city day"),
    ("rent price", "city"), ("dew point", "city"), ("ozone level", "city day"), ("library hours", "city day"),
    ("ferry times", "city time"), ("postcode", "city"), ("home address", "person"), ("nickname", "person"),
    ("favorite food", "person"), ("translation", "topic"), ("pronunciation", "topic"), ("word origin", "topic"),
    ("book review", "topic"), ("sleep score", "person day"), ("ticket price", "number city"),
    ("heart rate", "person time"),
]
# Action tools: (verb, object, argument kinds).
ACTIONS_TRAIN = [
    ("book", "table", "person day time"), ("set", "alarm", "time day"), ("send", "message", "person topic"),
    ("create", "event", "topic day time"), ("order", "pizza", "number"), ("call", "taxi", "city time"),
    ("book", "flight", "city day"), ("cancel", "meeting", "day time"), ("invite", "guest", "person day"),
    ("transfer", "money", "number person"), ("start", "timer", "number"), ("play", "song", "topic"),
    ("add", "reminder", "topic time"), ("share", "photo", "person"), ("rent", "car", "city day"),
    ("book", "hotel", "city day"), ("email", "report", "person topic"), ("buy", "groceries", "number day"),
    ("open", "window", "time"), ("start", "meeting", "person time"), ("delete", "note", "topic"),
    ("save", "contact", "person"), ("mute", "chat", "person"), ("follow", "artist", "topic"),
]
ACTIONS_HELDOUT = [
    ("reserve", "room", "city day"), ("schedule", "call", "person time"), ("order", "flowers", "person day"),
    ("pay", "invoice", "number"), ("water", "plants", "day time"), ("notify", "team", "topic"),
    ("block", "caller", "person"), ("print", "document", "topic"), ("lock", "door", "time"),
    ("wake", "computer", "day time"),
]
DESCRIBE = {  # tool descriptions: {what} is the subject or object phrase
    "train": {"lookup": ("Get the {what} for the given arguments", "Look up the current {what}", "Return the {what}",
                         "Find the {what}"),
              "action": ("{Verb} a {what}", "{Verb} a {what} for the user", "Lets the user {verb} a {what}")},
    "heldout": {"lookup": ("Reports the {what}", "Provides {what} information"),
                "action": ("Used to {verb} a {what}", "Tool that can {verb} a {what}")},
}
ASK = {  # request phrasings: {what} the subject or object, {args} the argument phrases
    "train": {"lookup": ("What is the {what} {args}?", "Tell me the {what} {args}.", "Check the {what} {args}.",
                         "I want the {what} {args}.", "Show me the {what} {args}.", "{What} {args}?",
                         "Can you get the {what} {args}?", "Look up the {what} {args}, please."),
              "action": ("Please {verb} a {what} {args}.", "{Verb} a {what} {args}.", "Can you {verb} a {what} {args}?",
                         "I need you to {verb} a {what} {args}.", "{Verb} a {what} {args}, thanks.")},
    "heldout": {"lookup": ("Could you find out the {what} {args}?", "I'm curious about the {what} {args}.",
                           "Please give me the {what} {args}."),
                "action": ("Would you {verb} a {what} {args}?", "Go ahead and {verb} a {what} {args}.",
                           "I'd like you to {verb} a {what} {args}.")},
}

# Rich wording ("rich"): the fine-tuning conversations' many phrasings, so that the model learns to read
# a request by its subject, its tool list and its values, not by the few templates it saw. None of the
# held-out phrasings occurs here (a test checks); the plain training wording stays as it was, since the
# tokenizer is trained on it.
_LOOKUP_ASKS = (
    "what is the {what} {args}?", "what's the {what} {args}?", "tell me the {what} {args}.",
    "check the {what} {args}.", "get the {what} {args}.", "fetch the {what} {args}.", "show me the {what} {args}.",
    "look up the {what} {args}.", "find the {what} {args}.", "can you get the {what} {args}?",
    "can you check the {what} {args}?", "could you look up the {what} {args}?", "could you tell me the {what} {args}?",
    "I want to know the {what} {args}.", "I need the {what} {args}.", "do you know the {what} {args}?",
    "pull up the {what} {args}.", "read me the {what} {args}.", "how about the {what} {args}?",
    "{what} {args}?", "the {what} {args}, please.", "{args}, what is the {what}?", "{args}: the {what}?",
    "I wonder what the {what} is {args}.", "let me know the {what} {args}.", "need the {what} {args}.",
    "is there any {what} data {args}?", "what does the {what} look like {args}?", "report the {what} {args}.",
)
_ACTION_ASKS = (
    "{verb} a {what} {args}.", "please {verb} a {what} {args}.", "can you {verb} a {what} {args}?",
    "could you {verb} a {what} {args}?", "I need you to {verb} a {what} {args}.",
    "I want you to {verb} a {what} {args}.",
    "I want to {verb} a {what} {args}.", "I need to {verb} a {what} {args}.", "help me {verb} a {what} {args}.",
    "let's {verb} a {what} {args}.", "time to {verb} a {what} {args}.", "{args}, {verb} a {what}.",
    "{verb} the {what} {args}.", "can you {verb} the {what} {args}?", "{verb} one {what} {args}, please.",
    "you can {verb} a {what} {args} now.", "kindly {verb} a {what} {args}.", "{args}: {verb} a {what}.",
    "we should {verb} a {what} {args}.", "make sure to {verb} a {what} {args}.",
)
_OPENERS = ("", "", "", "Hey, ", "Hi, ", "Quick question: ", "Okay, ", "Sorry, ", "Hello! ")
_CLOSERS = ("", "", "", " Thanks.", " Thank you!", " Cheers.")


def _compose(asks: tuple[str, ...]) -> tuple[str, ...]:
    """Every opener x request x closer (repeats kept: they weight the plain forms), the first letter
    capitalised where no opener precedes it ("{args}" -> "{Args}", "{verb}" -> "{Verb}")."""
    out = []
    for opener in _OPENERS:
        for ask in asks:
            body = ask
            if not opener:
                field = next((f for f in ("{args}", "{what}", "{verb}") if ask.startswith(f)), None)
                body = field[:2].upper() + ask[2:] if field else ask[0].upper() + ask[1:]
            out += [opener + body + closer for closer in _CLOSERS]
    return tuple(out)


ASK["rich"] = {"lookup": _compose(_LOOKUP_ASKS), "action": _compose(_ACTION_ASKS)}
DESCRIBE["rich"] = {
    "lookup": (*DESCRIBE["train"]["lookup"], "Fetch the latest {what}", "Returns {what} data", "Check the {what}",
               "Gives the {what} for a request", "Look up {what}", "{What} lookup", "Retrieve the {what}",
               "Shows the current {what}", "Answers questions about the {what}", "The {what} service"),
    "action": (*DESCRIBE["train"]["action"], "Can {verb} a {what}", "Use this to {verb} a {what}",
               "Call this to {verb} a {what}", "{Verb} one {what}", "Helps {verb} a {what}",
               "Will {verb} a {what} when asked", "Service to {verb} a {what}", "{Verb} a {what} right away"),
}
_RICH_PHRASES = {
    "city": ("near {v}", "at {v}", "in the city of {v}", "within {v}", "across {v}", "located in {v}",
             "for the town of {v}", "in central {v}"),
    "day": ("coming {v}", "during {v}", "on a {v}", "starting {v}", "until {v}", "{v}", "for the day {v}",
            "later on {v}"),
    "time": ("at about {v}", "starting at {v}", "before {v}", "at exactly {v}", "{v}", "no later than {v}",
             "close to {v}", "for {v}"),
    "person": ("belonging to {v}", "whose name is {v}", "for my friend {v}", "for contact {v}",
               "with my colleague {v}", "for user {v}", "for someone called {v}", "on behalf of {v}"),
    "number": ("for {v}", "with {v}", "adding up to {v}", "in total {v}", "equal to {v}", "summing to {v}",
               "of exactly {v}", "that is {v}"),
    "topic": ("on {v}", "titled {v}", "for {v}", "with the word {v}", "concerning {v}", "labelled {v}",
              "on the topic of {v}", "that says {v}"),
}
for _slot in SLOTS.values():
    _slot.phrases["rich"] = (*_slot.phrases["train"], *_RICH_PHRASES[_slot.kind])


@dataclass(frozen=True)
class Variety:
    """How the training split varies its tools and wordings (the held-out split ignores it).

    `made_up_verbs`: the fraction of tools with made-up verbs; `words`: a `vocabulary` to draw the
    made-up words from (else syllable strings); `rich_wording`: requests, descriptions and argument
    phrases from the many "rich" phrasings instead of the few plain ones; `noise`: the fraction of
    requests worded with random words around their content (see `_noisy_ask`); `confusable`: the
    fraction of distractors that share the right tool's verb and kinds of arguments (see `confusable`);
    `prefix`: the fraction of tool requests with random words and a joiner in front (see `_prefixed`);
    `tools`: the fewest and most tools a tool conversation lists (a single tool asks for no choice)."""

    made_up_verbs: float = 0.0
    words: tuple[str, ...] | None = None
    rich_wording: bool = False
    noise: float = 0.0
    confusable: float = 0.0
    prefix: float = 0.0
    tools: tuple[int, int] = (1, 4)

    def __post_init__(self) -> None:
        if not 1 <= self.tools[0] <= self.tools[1]:
            raise ValueError(f"Variety.tools must be (fewest, most) with 1 <= fewest <= most, got {self.tools}")


PLAIN = Variety()  # the tokenizer's conversations


def wording(split: str, variety: Variety) -> str:
    """The key of the phrasing tables (ASK, DESCRIBE, Slot.phrases) for `split` under `variety`."""
    return "rich" if split == "train" and variety.rich_wording else split


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    kind: str  # lookup | action
    verb: str
    what: str
    params: tuple[tuple[str, Slot], ...]  # (parameter name, slot)

    def schema(self) -> dict[str, Any]:
        """The tool in OpenAI's JSON-schema shape, as it is listed in the system turn."""
        props = {name: {"type": slot.type, "description": slot.descriptions[0]} for name, slot in self.params}
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": props, "required": [n for n, _ in self.params]}}}


def make_tool(rng: random.Random, split: str, kind: str, verb: str, what: str, slots: str,
              variety: Variety = PLAIN) -> Tool:
    """A tool from parts, with parameter names and description drawn at random."""
    params, used = [], set()
    for s in slots.split():
        slot = SLOTS[s]
        name = made_up_or(rng, split, MADE_UP_PARAM_FRACTION, rng.choice([n for n in slot.names if n not in used]),
                          variety.words)
        used.add(name)
        params.append((name, slot))
    desc = rng.choice(DESCRIBE[wording(split, variety)][kind]).format(
        what=what, What=what.capitalize(), verb=verb, Verb=verb.capitalize())
    return Tool(f"{verb}_{what.replace(' ', '_')}", desc, kind, verb, what, tuple(params))


def heldout_words() -> set[str]:
    """Every word of the held-out subjects, objects and verbs: never drawn as a made-up word."""
    parts = [w for what, _ in LOOKUPS_HELDOUT for w in what.split()]
    parts += [w for verb, what, _ in ACTIONS_HELDOUT for w in (verb, *what.split())]
    return set(parts)


def vocabulary(docs: Iterable[str], min_count: int = 10) -> tuple[str, ...]:
    """Lower-case words of 3-12 letters seen at least `min_count` times in `docs`, minus the held-out
    tools' words: real words to stand in for made-up ones (sorted, so deterministic in `docs`)."""
    counts = Counter(w for d in docs for w in re.findall(r"\b[a-z]{3,12}\b", d))
    banned = heldout_words()
    return tuple(sorted(w for w, n in counts.items() if n >= min_count and w not in banned))


def made_up_word(rng: random.Random, words: Sequence[str] | None = None) -> str:
    """A word no prior predicts: a random word of `words`, else a string of two or three syllables."""
    if words:
        return rng.choice(words)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def made_up_what(rng: random.Random, words: Sequence[str] | None) -> str:
    """A made-up subject or object: from `words`, one or (a third of the time) two words, as real
    tool subjects are ("humidity", "air quality")."""
    if words and rng.random() < 1 / 3:
        return f"{made_up_word(rng, words)} {made_up_word(rng, words)}"
    return made_up_word(rng, words)


def made_up_or(rng: random.Random, split: str, fraction: float, word: str,
               words: Sequence[str] | None = None) -> str:
    """`word`, or in training, a `fraction` of the time, a made-up word in its place."""
    return made_up_word(rng, words) if split == "train" and fraction and rng.random() < fraction else word


def lookup_verb(rng: random.Random) -> str:
    """`get` half the time, as in most real tool sets; otherwise any lookup verb."""
    return "get" if rng.random() < 0.5 else rng.choice(VERBS_LOOKUP)


def random_tool(rng: random.Random, split: str, variety: Variety = PLAIN) -> Tool:
    """A tool of `split`; in training, a `variety.made_up_verbs` fraction have a made-up verb
    (`zormef_weather`, "Please zormef a table"), which only reading the tool list or the request predicts."""
    words, made_up_verbs = variety.words, variety.made_up_verbs
    lookups = LOOKUPS_TRAIN if split == "train" else LOOKUPS_HELDOUT
    actions = ACTIONS_TRAIN if split == "train" else ACTIONS_HELDOUT
    made_up = split == "train" and rng.random() < MADE_UP_FRACTION
    if rng.random() < 0.6:
        what, slots = (made_up_what(rng, words), rng.choice(SLOT_SETS)) if made_up else rng.choice(lookups)
        verb = made_up_or(rng, split, made_up_verbs, lookup_verb(rng), words)
        return make_tool(rng, split, "lookup", verb, what, slots, variety)
    verb, what, slots = rng.choice(actions)
    verb = made_up_or(rng, split, made_up_verbs, verb, words)
    if made_up:
        what, slots = made_up_what(rng, words), rng.choice(SLOT_SETS)
    return make_tool(rng, split, "action", verb, what, slots, variety)


def _value(rng: random.Random, slot: Slot, split: str, words: Sequence[str] | None = None) -> Any:
    """An argument value; in training, half the cities, people and topics are made-up words."""
    if split == "train" and slot.kind in ("city", "person", "topic") and rng.random() < MADE_UP_VALUE_FRACTION:
        word = made_up_word(rng, words)
        return word if slot.kind == "topic" else word.capitalize()
    return slot.value(rng)


def tool_conversation(
    rng: random.Random, split: str = "train", exchanges: int = 1, variety: Variety = PLAIN,
) -> dict[str, Any]:
    """A conversation: tools listed, a request, the call, its result, and the final answer.

    The offered tools are the right one plus up to three distractors from the same split (in training,
    as many as `variety.tools` allows) with other subjects, in a random order, so the model must
    choose by reading the list. With `exchanges` > 1 the user goes on, up to that many exchanges in
    all, with requests for other listed tools or a plain question: the model learns to pick from the
    same list again, to follow a conversation, and it reads the long tool list once for several calls.
    """
    if split == "train" and rng.random() < 0.15:
        tool, args, ask, result, answer = _classic(rng)
    else:
        tool = random_tool(rng, split, variety)
        args, ask, result, answer = _request(rng, tool, split, variety)
    offered = [tool]
    fewest, most = variety.tools if split == "train" else PLAIN.tools
    while len(offered) < fewest + rng.randint(0, most - fewest):
        other = random_tool(rng, split, variety)
        if variety.confusable and rng.random() < variety.confusable:
            other = confusable(rng, split, variety, tool, other)
        if all(other.what != t.what for t in offered):
            offered.append(other)
    rng.shuffle(offered)
    messages = _exchange(rng, tool, args, ask, result, answer)
    if exchanges > 1:
        called = {tool.name}
        for _ in range(rng.randint(0, exchanges - 1)):
            fresh = [t for t in offered if t.name not in called]
            if fresh and rng.random() < 0.8:
                nxt = rng.choice(fresh)
                called.add(nxt.name)
                messages += _exchange(rng, nxt, *_request(rng, nxt, split, variety))
            else:
                messages += chat_conversation(rng, system=False)["messages"]
    return {"messages": messages, "tools": [t.schema() for t in offered],
            "expected": {"name": tool.name, "arguments": args}}


def confusable(rng: random.Random, split: str, variety: Variety, tool: Tool, other: Tool) -> Tool:
    """`other` remade with `tool`'s verb and kinds of arguments, so that only the subject or object
    tells them apart (`get_humidity(city)` beside `get_rent_price(city)`). Random distractors mostly
    differ in those too, and a model can learn to pick by them. (In the bundled recipe this made the
    model worse at choosing held-out tools: see `BundleConfig.sft_confusable`.)"""
    kinds = " ".join(slot.kind for _, slot in tool.params)
    if not all(k in SLOTS for k in kinds.split()):  # the demo tools' own kinds (expression, unit)
        return other
    return make_tool(rng, split, other.kind, tool.verb, other.what, kinds, variety)


def _request(rng: random.Random, tool: Tool, split: str,
             variety: Variety = PLAIN) -> tuple[dict[str, Any], str, str, str]:
    """Arguments for `tool`, the request that asks for them, the tool's result and the answer."""
    args = {name: _value(rng, slot, split, variety.words) for name, slot in tool.params}
    key = wording(split, variety)
    noisy = split == "train" and variety.noise > 0 and rng.random() < variety.noise
    phrases = [_phrase(rng, slot, key, args[name], noisy, variety.words) for name, slot in tool.params]
    rng.shuffle(phrases)
    args_text = " ".join(phrases)
    if noisy:
        ask = _noisy_ask(rng, tool, args_text, variety.words)
    else:
        template = rng.choice(ASK[key][tool.kind])
        ask = template.format(what=tool.what, What=tool.what.capitalize(), verb=tool.verb,
                              Verb=tool.verb.capitalize(), args=args_text, Args=args_text[:1].upper() + args_text[1:])
    if split == "train" and variety.prefix and rng.random() < variety.prefix:
        ask = _prefixed(rng, ask, variety.words)
    where = " ".join(phrases)
    if tool.kind == "lookup":
        n = rng.randint(1, 999)
        return args, ask, json.dumps({tool.what.replace(" ", "_"): n}), f"The {tool.what} {where} is {n}."
    result = json.dumps({"status": "done", "id": rng.randint(100, 999)})
    return args, ask, result, f"Done: your {tool.what} {where} is confirmed."


def _phrase(rng: random.Random, slot: Slot, key: str, value: Any, noisy: bool = False,
            words: Sequence[str] | None = None) -> str:
    """How a request mentions `value`: a phrase of the `key` wording, or (if `noisy`, half the time, for
    the kinds whose values show what they are: a capitalised name, a day, a time, a number) one or two
    random made-up words in front of it, so that the value must be found by its form."""
    if noisy and slot.kind != "topic" and rng.random() < 0.5:
        return f"{_filler(rng, words, 1, 2)} {value}"
    return rng.choice(slot.phrases[key]).format(v=value)


def _filler(rng: random.Random, words: Sequence[str] | None, lo: int, hi: int) -> str:
    """`lo` to `hi` random made-up words."""
    return " ".join(made_up_word(rng, words) for _ in range(rng.randint(lo, hi)))


def _noisy_ask(rng: random.Random, tool: Tool, args_text: str, words: Sequence[str] | None) -> str:
    """A request whose frame is random words around the tool's subject ("the humidity") or verb and
    object ("reserve a room") and the argument phrases: "Lantern ahead the humidity near Paris mill?".

    Why: with any fixed set of templates, however large, the model keys on the template ("Could you
    find out the rent price" -> `find_dew_point`, the wrong subject with the request's verb) and on the
    words before a value ("next Wednesday" -> "Monday"). In a request with no template the only
    clues are the content: the subject or action that matches one listed tool, and values by their form.
    A trailing filler is left out when a topic (a lower-case word) ends the request. (In the bundled
    recipe's second stage it did not measurably help: see `BundleConfig.sft_rich_noise`.)"""
    if tool.kind == "lookup":
        core = rng.choice(["the {what}", "{what}", "the {what} {args}", "{what} {args}", "{args} the {what}"])
    else:
        core = rng.choice(["{verb} a {what}", "{verb} the {what}", "{verb} a {what} {args}", "{verb} the {what} {args}",
                           "{args} {verb} a {what}"])
    if "{args}" not in core:  # the arguments after the subject, with random words between them at times
        core += " {args}" if rng.random() < 0.7 else f" {_filler(rng, words, 1, 2)} {{args}}"
    text = f"{_filler(rng, words, 1, 4)} {core.format(what=tool.what, verb=tool.verb, args=args_text)}"
    if not any(slot.kind == "topic" for _, slot in tool.params) and rng.random() < 0.4:
        text += f" {_filler(rng, words, 1, 2)}"
    return text[0].upper() + text[1:] + rng.choice(["?", ".", "!", "", ", please."])


PREFIX_JOINERS = (" and ", ", ", " to ", ": ", " then ", "! ")


def _prefixed(rng: random.Random, ask: str, words: Sequence[str] | None) -> str:
    """`ask` behind one to three random words and a joiner: "Chicken dandy! check the birthday of Ines."

    Why: trained on "{Verb} a {what}" requests, the model took a request's capitalised first word for the
    tool's verb, and where no listed tool had it ("Go ahead and lock a door"), it called the last tool
    listed. Random words in front of the request, which no tool is named after, break that habit."""
    head = _filler(rng, words, 1, 3)
    rest = ask if ask.startswith(("I ", "I'")) else ask[:1].lower() + ask[1:]
    return head[:1].upper() + head[1:] + rng.choice(PREFIX_JOINERS) + rest


def _exchange(rng: random.Random, tool: Tool, args: dict[str, Any], ask: str, result: str,
              answer: str) -> list[dict[str, Any]]:
    """The four messages of one tool use: request, call, result, answer."""
    call = {"id": f"call_{rng.randrange(16**8):08x}", "type": "function",
            "function": {"name": tool.name, "arguments": json.dumps(args)}}
    return [{"role": "user", "content": ask},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": result},
            {"role": "assistant", "content": answer}]


def _classic(rng: random.Random) -> tuple[Tool, dict[str, Any], str, str, str]:
    """The tools of the README's demos, with answers computed from their arguments."""
    city = SLOTS["city"]
    if rng.random() < 0.4:
        tool = Tool("get_weather", "Get the current weather in a city", "lookup", "get", "weather", (("city", city),))
        args = {"city": rng.choice(CITIES)}
        n, cond = rng.randint(-5, 35), rng.choice(CONDITIONS)
        ask = rng.choice(["What's the weather in {c}?", "Is it raining in {c}?", "How warm is it in {c}?"])
        return tool, args, ask.format(c=args["city"]), json.dumps({"temperature": n, "condition": cond}), (
            f"It is {cond} and {n} degrees in {args['city']}.")
    if rng.random() < 0.5:
        tool = Tool("calculate", "Evaluate an arithmetic expression", "lookup", "calculate", "result",
                    (("expression", Slot("expression", ("expression",), ("The expression, e.g. 2 + 3 * 4",),
                                         lambda r: "", {})),))
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        args = {"expression": f"{a} + {b} * {c}"}
        n = eval_expression(args["expression"])
        ask = rng.choice(["Calculate {e}.", "What is {e}? Use the calculator."]).format(e=args["expression"])
        return tool, args, ask, json.dumps({"value": n}), f"The result is {n}."
    number = SLOTS["number"]
    unit = Slot("unit", ("unit",), ("A unit such as km or pounds",), lambda r: "", {})
    tool = Tool("convert_units", "Convert a value from one unit to another", "lookup", "convert", "units",
                (("value", number), ("from_unit", unit), ("to_unit", unit)))
    src, dst = rng.choice(UNITS)
    args = {"value": rng.randint(1, 500), "from_unit": src, "to_unit": dst}
    n = rng.randint(1, 999)
    ask = rng.choice(["Convert {v} {f} to {t}.", "How many {t} is {v} {f}?"]).format(v=args["value"], f=src, t=dst)
    return tool, args, ask, json.dumps({"result": n}), f"{args['value']} {src} is {n} {dst}."


def eval_expression(expr: str) -> int:
    """`a + b * c` with the precedence a calculator applies (no eval)."""
    a, rest = expr.split(" + ")
    b, c = rest.split(" * ")
    return int(a) + int(b) * int(c)


GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"), ("Hi", "Hi! What can I do for you?"),
    ("Good morning", "Good morning! How can I help?"), ("How are you?", "I'm doing well, thank you. How can I help?"),
    ("Thanks!", "You're welcome!"), ("Who are you?", "I am a small assistant built with lfm2."),
    ("Bye", "Goodbye! Have a nice day."), ("What can you do?", "I can chat, answer simple questions and use tools."),
]


def chat_conversation(rng: random.Random, system: bool = True) -> dict[str, Any]:
    """A short exchange without tools: greeting, a fact from a table, or small arithmetic
    (`system`: sometimes with a system prompt, as a conversation's first exchange)."""
    kind = rng.randrange(5)
    if kind == 0:
        q, a = rng.choice(GREETINGS)
    elif kind == 1:
        country, city = rng.choice(list(CAPITALS.items()))
        q = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?"]).format(c=country)
        a = f"The capital of {country} is {city}."
    elif kind == 2:
        thing, color = rng.choice(list(COLORS.items()))
        q, a = f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is {color}."
    else:  # arithmetic twice as often: small sums and differences
        x, y = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice(["+", "-"])
        q = rng.choice(["What is {x} {op} {y}?", "{x} {op} {y} = ?", "Compute {x} {op} {y}."]).format(x=x, op=op, y=y)
        a = f"{x} {op} {y} = {x + y if op == '+' else x - y}."
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if system and rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return {"messages": messages}


def conversations(
    n: int, seed: int, split: str = "train", tool_fraction: float = 0.6, exchanges: int = 1,
    variety: Variety = PLAIN,
) -> list[dict[str, Any]]:
    """`n` conversations, a `tool_fraction` of them with tools; deterministic in `seed`.

    In the training split, one chat conversation in five also lists tools it does not need, so the
    model learns to answer directly when no tool fits. `exchanges` > 1 lets conversations go on
    for up to that many exchanges (with `exchanges=1` the conversations are those of before).
    `variety` (see `Variety`) varies the training split's tools and wordings."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < tool_fraction:
            out.append(tool_conversation(rng, split, exchanges, variety))
            continue
        conv = chat_conversation(rng)
        for _ in range(rng.randint(0, exchanges - 1) if exchanges > 1 else 0):
            conv["messages"] += chat_conversation(rng, system=False)["messages"]
        if split == "train" and rng.random() < 0.2:
            conv["tools"] = [random_tool(rng, split, variety).schema() for _ in range(rng.randint(1, 3))]
        out.append(conv)
    return out
