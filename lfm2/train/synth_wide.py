"""Tool-use conversations from a wide, hand-written catalogue of tools as people really define them.

Why: `lfm2.train.synth` builds every tool from one template family (a verb and a subject such as
`get_humidity`, a handful of argument kinds, made-up syllable words). The bundled model learned that
family and little else: given tools written the way real APIs are (`currency_converter` beside
`unit_converter`, `sendMessage(recipient, text)`, enums, optional numbers), it picked the wrong tool,
wrote junk argument values, and it opened a tool call even when no tool was listed at all.

`wide_conversations(n, seed)` returns conversations in exactly the dict format of
`synth.conversations` (OpenAI-shaped messages and wrapped `tools`; `expected` on tool calls), of
three kinds:

1. about 60%: a request that one listed tool answers. About sixty archetypes over many domains
   (money, travel, time, messaging, language, media, food, shopping, health, home, information,
   fun), each with several tool names in different styles (`get_stock_price`, `stock_quote`,
   `getStockPrice`, `quote`), several names for each parameter (`symbol` / `ticker` / `stock`),
   typed parameters (string, integer, number, boolean, enums), required and optional ones, and
   several descriptions. Values come from wide pools (cities worldwide, currency codes, tickers,
   languages, names, YYYY-MM-DD dates, times, decimals, free-text messages) and are placed in many
   phrasings; the call copies them literally (numbers as numbers). One to five tools are listed,
   the right one at a random position among distractors that are often from a related domain
   (stock price beside exchange rate and crypto price). A tool result and a short answer follow.
2. about 20%: tools are listed but the request is ordinary (a greeting, a joke, a general
   question, thanks) or needs a tool that is not listed: the assistant answers in plain text
   ("I don't have a tool for that, but ...").
3. about 20%: no tools at all, for ordinary and tool-like requests alike ("What's the weather in
   Oslo?"): the assistant answers in plain text and never calls a tool.

Every vocabulary here is written from general knowledge. It must never draw from the held-out
evaluation set in `benchmarks/data/` (nor from the code that reads it): a model trained on these
conversations is measured on that set, which is only a measurement while it stays unseen.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Value pools
# ---------------------------------------------------------------------------------------------------

CITIES = ["Oslo", "Paris", "Tokyo", "Nairobi", "Lima", "Toronto", "Sydney", "Mumbai", "Sao Paulo", "Mexico City",
          "Cape Town", "Istanbul", "Bangkok", "Seoul", "Berlin", "Madrid", "Rome", "Cairo", "Buenos Aires",
          "Vancouver", "Chicago", "New York", "Los Angeles", "San Francisco", "Lagos", "Accra", "Dubai", "Singapore",
          "Jakarta", "Manila", "Hanoi", "Reykjavik", "Helsinki", "Stockholm", "Copenhagen", "Dublin", "Edinburgh",
          "Lisbon", "Vienna", "Prague", "Warsaw", "Budapest", "Athens", "Zurich", "Amsterdam", "Brussels",
          "Montreal", "Denver", "Austin", "Seattle", "Boston", "Miami", "Bogota", "Santiago", "Auckland", "Perth",
          "Kyoto", "Osaka", "Shanghai", "Hong Kong", "Taipei", "Delhi", "Casablanca", "Addis Ababa", "Doha",
          "Kathmandu", "Marrakech", "Lyon", "Munich", "Glasgow"]
COUNTRIES = ["Canada", "Japan", "Brazil", "Germany", "Kenya", "Australia", "India", "Mexico", "France", "Norway",
             "Italy", "Spain", "Nigeria", "Vietnam", "Chile", "Ireland", "Egypt", "South Korea", "Peru", "Sweden"]
AIRPORTS = ["JFK", "LAX", "LHR", "CDG", "NRT", "HND", "SFO", "ORD", "DXB", "SIN", "FRA", "AMS", "MAD", "BCN",
            "FCO", "IST", "SYD", "YYZ", "MEX", "GRU", "BOM", "DEL", "ICN", "HKG", "OSL", "CPH", "ARN", "DUB",
            "ZRH", "LIS", "NBO", "JNB", "SEA", "BOS", "ATL"]
AIRLINES = ["BA", "LH", "AF", "UA", "DL", "EK", "QF", "NH", "KL", "AA", "TK", "SQ", "LX", "IB"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD", "AUD", "NZD", "CNY", "INR", "BRL", "MXN", "ZAR", "SEK",
              "NOK", "DKK", "KRW", "SGD", "HKD", "TRY", "PLN", "THB", "AED"]
TICKERS = ["AAPL", "MSFT", "GOOGL", "AMZN", "NVDA", "TSLA", "META", "NFLX", "IBM", "INTC", "AMD", "ORCL", "KO",
           "PEP", "DIS", "NKE", "JPM", "WMT", "SAP", "TM", "SHOP", "UBER", "ADBE", "CSCO", "SBUX"]
COINS = ["BTC", "ETH", "SOL", "ADA", "XRP", "DOGE", "DOT", "LTC", "AVAX", "LINK", "bitcoin", "ethereum", "solana"]
PEOPLE = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Gustavo", "Hana", "Ibrahim", "Julia", "Kenji",
          "Leila", "Marco", "Nadia", "Olu", "Pablo", "Qiu", "Rahul", "Sofia", "Tomas", "Uma", "Viktor", "Wen",
          "Yara", "Zoe", "Mateo", "Ingrid", "Amara", "Lars", "Mei", "Diego", "Anika", "Sven", "Priya", "Kwame"]
SURNAMES = ["Garcia", "Okafor", "Tanaka", "Muller", "Rossi", "Nguyen", "Kowalski", "Silva", "Haddad", "Larsen",
            "Kim", "Patel", "Dubois", "Mensah", "Novak", "Fischer", "Costa", "Ali", "Johansson", "Moreau"]
MESSAGES = ["I'm running 10 minutes late", "Can we move lunch to Friday?", "Happy birthday!",
            "The meeting is cancelled", "Don't forget the milk", "Call me when you land", "See you at the station",
            "Thanks for your help today", "Dinner is ready", "I left the keys under the mat",
            "The report is done", "Are you free this weekend?", "On my way home", "Good luck with the exam",
            "Please send me the slides", "Let's meet at 6"]
TASKS = ["call the dentist", "pick up the dry cleaning", "water the plants", "pay the rent", "buy milk",
         "submit the report", "renew my passport", "book a haircut", "feed the cat", "back up my laptop",
         "return the library books", "email the landlord"]
EVENT_TITLES = ["Team sync", "Project review", "Yoga class", "Budget meeting", "Book club", "Doctor visit",
                "Parent-teacher meeting", "Quarterly planning", "Coffee with Sam", "Guitar lesson"]
PLACES = ["Central Station", "City Hall", "the Grand Hotel", "Terminal 2", "12 Elm Street", "450 Market Street",
          "Union Square", "the main library", "Riverside Park", "88 King Road", "the Science Museum",
          "Harbor Mall", "Oak Avenue 5"]
PLACE_TYPES = ["coffee shop", "pharmacy", "gas station", "sushi restaurant", "bookstore", "ATM", "gym",
               "bakery", "vet clinic", "laundromat"]
LABELS = ["pasta", "tea", "laundry", "break", "oven", "workout", "bread", "meditation"]
NOTE_TITLES = ["Groceries", "Ideas", "Meeting notes", "Trip plan", "Gift list", "Reading list"]
SUBJECTS = ["Quarterly report", "Dinner plans", "Invoice 2231", "Vacation photos", "Meeting notes",
            "Job application", "Rent reminder", "Weekend trip"]
SONGS = ["Bohemian Rhapsody", "Clair de Lune", "Hey Jude", "Dancing Queen", "Hotel California", "Blue in Green",
         "Superstition", "Redemption Song", "Imagine", "Take Five", "Respect", "Wonderwall"]
ARTISTS = ["Adele", "Coldplay", "Miles Davis", "Taylor Swift", "Bob Marley", "Daft Punk", "Fela Kuti",
           "Nina Simone", "ABBA", "Stevie Wonder", "Radiohead", "Shakira"]
POD_TOPICS = ["history", "true crime", "startups", "astronomy", "cooking", "language learning", "psychology",
              "climate", "philosophy", "personal finance"]
MOVIES = ["Dune", "Oppenheimer", "Inception", "Casablanca", "Spirited Away", "The Matrix", "Parasite", "Amelie",
          "Black Panther", "The Godfather", "Coco", "Interstellar"]
BOOKS = {"Pride and Prejudice": "Jane Austen", "The Hobbit": "J.R.R. Tolkien", "Beloved": "Toni Morrison",
         "Things Fall Apart": "Chinua Achebe", "One Hundred Years of Solitude": "Gabriel Garcia Marquez",
         "The Left Hand of Darkness": "Ursula K. Le Guin", "1984": "George Orwell", "Frankenstein": "Mary Shelley",
         "The Alchemist": "Paulo Coelho", "Norwegian Wood": "Haruki Murakami"}
TEAMS = ["Arsenal", "Real Madrid", "Lakers", "Yankees", "Boca Juniors", "Bayern Munich", "Chicago Bulls",
         "Golden State Warriors", "All Blacks", "Juventus", "Boston Celtics", "Ajax"]
NEWS_TOPICS = ["climate", "technology", "elections", "space", "football", "the economy", "AI", "health care",
               "renewable energy", "the housing market"]
WIKI = {"Marie Curie": "Marie Curie was a physicist and chemist who won two Nobel Prizes for work on radioactivity.",
        "photosynthesis": "Photosynthesis is how plants turn light, water and carbon dioxide into sugar and oxygen.",
        "the Great Wall of China": "The Great Wall of China is a series of walls built over centuries in northern "
                                   "China.",
        "black holes": "A black hole is a region of space where gravity is so strong that not even light escapes.",
        "the Roman Empire": "The Roman Empire ruled the Mediterranean world from 27 BC until the fall of the west "
                            "in 476.",
        "Ada Lovelace": "Ada Lovelace wrote what is seen as the first computer program, for Babbage's engine.",
        "volcanoes": "Volcanoes are openings in the crust where molten rock, ash and gas escape.",
        "the Amazon rainforest": "The Amazon is the largest tropical rainforest, spread over nine countries."}
INGREDIENTS = ["chicken", "lentils", "tofu", "salmon", "spinach", "mushrooms", "chickpeas", "eggplant", "rice",
               "sweet potato", "shrimp", "quinoa"]
FOODS = ["banana", "avocado", "boiled egg", "slice of pizza", "cup of rice", "apple", "bagel", "glass of milk"]
RESTAURANTS = ["Luigi's Trattoria", "Sakura Sushi", "The Green Fork", "Casa Lola", "Blue Door Bistro",
               "Spice Route", "Harbor Grill"]
PRODUCTS = ["wireless earbuds", "running shoes", "coffee grinder", "yoga mat", "desk lamp", "backpack",
            "phone charger", "water bottle", "rain jacket", "mechanical keyboard"]
ACTIVITIES = ["running", "cycling", "swimming", "yoga", "rowing", "hiking", "weight training"]
ROOMS = ["living room", "kitchen", "bedroom", "office", "hallway", "garage", "bathroom"]
DOORS = ["front door", "back door", "garage door", "side gate"]
FILES = ["budget 2025.xlsx", "trip itinerary", "resume.pdf", "meeting notes", "tax return", "lease agreement",
         "wedding photos", "thesis draft"]
MAIL_DOMAINS = ["example.com", "mail.org", "work.net"]
QUOTE_TOPICS = ["courage", "success", "friendship", "patience", "change", "learning"]
DEFINITIONS = {"serendipity": "finding something good by chance", "ephemeral": "lasting a very short time",
               "ubiquitous": "found everywhere", "meticulous": "very careful about small details",
               "resilient": "able to recover quickly from difficulty", "candid": "honest and direct",
               "frugal": "careful not to waste money", "eloquent": "fluent and persuasive in speech",
               "gregarious": "fond of company", "pragmatic": "dealing with things in a practical way"}
MISSPELLED = {"recieve": "receive", "definately": "definitely", "seperate": "separate", "occured": "occurred",
              "accomodate": "accommodate", "neccessary": "necessary", "wierd": "weird", "untill": "until",
              "calender": "calendar", "goverment": "government"}
PHRASES = {  # phrase -> {language: translation}
    "good morning": {"Spanish": "buenos días", "French": "bonjour", "German": "guten Morgen",
                     "Italian": "buongiorno", "Portuguese": "bom dia"},
    "thank you very much": {"Spanish": "muchas gracias", "French": "merci beaucoup", "German": "vielen Dank",
                            "Italian": "grazie mille", "Portuguese": "muito obrigado"},
    "where is the train station": {"Spanish": "dónde está la estación de tren", "French": "où est la gare",
                                   "German": "wo ist der Bahnhof", "Italian": "dov'è la stazione",
                                   "Portuguese": "onde fica a estação de trem"},
    "I would like a coffee": {"Spanish": "quisiera un café", "French": "je voudrais un café",
                              "German": "ich hätte gern einen Kaffee", "Italian": "vorrei un caffè",
                              "Portuguese": "eu queria um café"},
    "see you tomorrow": {"Spanish": "hasta mañana", "French": "à demain", "German": "bis morgen",
                         "Italian": "a domani", "Portuguese": "até amanhã"},
    "how much does this cost": {"Spanish": "cuánto cuesta esto", "French": "combien ça coûte",
                                "German": "wie viel kostet das", "Italian": "quanto costa questo",
                                "Portuguese": "quanto custa isto"},
}
JOKES = ["Why don't scientists trust atoms? Because they make up everything.",
         "I told my computer a joke about UDP. I'm not sure it got it.",
         "Why did the scarecrow win an award? He was outstanding in his field.",
         "What do you call a fish with no eyes? A fsh.",
         "Why do programmers prefer dark mode? Because light attracts bugs.",
         "I'm reading a book about anti-gravity. It's impossible to put down.",
         "Why did the bicycle fall over? It was two tired.",
         "What do you call a bear with no teeth? A gummy bear."]
QUOTES = ["\"The journey of a thousand miles begins with one step.\" - Lao Tzu",
          "\"It always seems impossible until it's done.\" - Nelson Mandela",
          "\"Be yourself; everyone else is already taken.\" - Oscar Wilde",
          "\"The best way out is always through.\" - Robert Frost",
          "\"Patience is bitter, but its fruit is sweet.\" - Jean-Jacques Rousseau"]
UNIT_FACTORS = {("km", "miles"): 0.621371, ("miles", "km"): 1.609344, ("kg", "pounds"): 2.204623,
                ("pounds", "kg"): 0.453592, ("meters", "feet"): 3.28084, ("feet", "meters"): 0.3048,
                ("liters", "gallons"): 0.264172, ("gallons", "liters"): 3.785412, ("cm", "inches"): 0.393701,
                ("inches", "cm"): 2.54, ("celsius", "fahrenheit"): None, ("fahrenheit", "celsius"): None}


def _date(rng: random.Random) -> str:
    return f"{rng.choice([2025, 2026])}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _time(rng: random.Random) -> str:
    return f"{rng.randint(5, 22):02d}:{rng.choice(['00', '05', '15', '20', '30', '40', '45'])}"


def _money(rng: random.Random) -> int | float:
    """An amount as people type it: round numbers mostly, some with cents."""
    if rng.random() < 0.6:
        return rng.choice([5, 10, 20, 25, 50, 75, 100, 120, 150, 200, 250, 300, 500, 750, 1000, 1200, 2500, 5000])
    return round(rng.uniform(1, 3000), 2)


def _tracking(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "1Z" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(10))
    return "".join(rng.choice(string.digits) for _ in range(12))


# slot -> value generator; a slot "city2" draws like "city" (and differs from it in one request)
VALUES: dict[str, Callable[[random.Random], Any]] = {
    "city": lambda r: r.choice(CITIES), "country": lambda r: r.choice(COUNTRIES),
    "airport": lambda r: r.choice(AIRPORTS), "date": _date, "time": _time,
    "flight": lambda r: f"{r.choice(AIRLINES)}{r.randint(10, 2999)}",
    "cur": lambda r: r.choice(CURRENCIES), "ticker": lambda r: r.choice(TICKERS), "coin": lambda r: r.choice(COINS),
    "amount": _money, "person": lambda r: r.choice(PEOPLE),
    "fullname": lambda r: f"{r.choice(PEOPLE)} {r.choice(SURNAMES)}",
    "email": lambda r: f"{r.choice(PEOPLE).lower()}.{r.choice(SURNAMES).lower()}@{r.choice(MAIL_DOMAINS)}",
    "phone": lambda r: f"+1 555 {r.randint(100, 999)} {r.randint(1000, 9999)}",
    "message": lambda r: r.choice(MESSAGES), "task": lambda r: r.choice(TASKS),
    "event": lambda r: r.choice(EVENT_TITLES), "place": lambda r: r.choice(PLACES),
    "ptype": lambda r: r.choice(PLACE_TYPES), "label": lambda r: r.choice(LABELS),
    "note_title": lambda r: r.choice(NOTE_TITLES), "subject": lambda r: r.choice(SUBJECTS),
    "song": lambda r: r.choice(SONGS), "artist": lambda r: r.choice(ARTISTS),
    "pod_topic": lambda r: r.choice(POD_TOPICS), "movie": lambda r: r.choice(MOVIES),
    "book": lambda r: r.choice(list(BOOKS)), "team": lambda r: r.choice(TEAMS),
    "news_topic": lambda r: r.choice(NEWS_TOPICS), "wiki": lambda r: r.choice(list(WIKI)),
    "ingredient": lambda r: r.choice(INGREDIENTS), "food": lambda r: r.choice(FOODS),
    "restaurant": lambda r: r.choice(RESTAURANTS), "product": lambda r: r.choice(PRODUCTS),
    "activity": lambda r: r.choice(ACTIVITIES), "room": lambda r: r.choice(ROOMS), "door": lambda r: r.choice(DOORS),
    "file": lambda r: r.choice(FILES), "quote_topic": lambda r: r.choice(QUOTE_TOPICS),
    "word": lambda r: r.choice(list(DEFINITIONS)), "misspelled": lambda r: r.choice(list(MISSPELLED)),
    "tracking": _tracking,
    "minutes": lambda r: r.choice([1, 2, 3, 5, 8, 10, 12, 15, 20, 25, 30, 45, 60, 90]),
    "small": lambda r: r.randint(2, 8), "nights": lambda r: r.randint(1, 14), "days": lambda r: r.randint(2, 7),
    "limit": lambda r: r.randint(3, 10), "years": lambda r: r.choice([5, 10, 15, 20, 25, 30]),
    "hours": lambda r: r.randint(1, 6), "percent": lambda r: r.choice([10, 20, 25, 30, 40, 50, 60, 75, 80, 100]),
    "year": lambda r: r.choice([2025, 2026]), "length": lambda r: r.choice([8, 10, 12, 16, 20, 24, 32]),
    "principal": lambda r: r.choice([5000, 12000, 25000, 150000, 250000, 320000, 400000]),
    "rate": lambda r: round(r.uniform(2.5, 9.5), 1),
    "parcel_kg": lambda r: round(r.uniform(0.5, 25), 1), "body_kg": lambda r: round(r.uniform(48, 110), 1),
    "height_cm": lambda r: r.randint(150, 198), "temp": lambda r: r.choice([18, 19, 20, 21, 22, 23, 24, 20.5, 21.5]),
    "max_price": lambda r: r.choice([30, 50, 80, 100, 150, 200, 49.99, 99.99]),
}


# ---------------------------------------------------------------------------------------------------
# Archetypes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter: the request slot that fills it and the names a tool author might give it."""

    slot: str
    names: tuple[str, ...]
    type: str
    desc: str
    enum: tuple[str, ...] = ()
    required: bool = True


Ask = str | tuple[str, dict[str, Any]]  # a request template, or one with constant arguments (booleans, enums)
Result = Callable[[random.Random, dict[str, Any]], tuple[dict[str, Any], str]]


@dataclass(frozen=True)
class Archetype:
    """A kind of tool as people write them, with the requests that call it and what it returns.

    `domain` names tools that could answer each other's requests (never listed as distractors of one
    another); `groups` name related domains, whose tools make the hardest distractors. `ability`,
    `noun` and `tip` word the plain reply when the tool is not available; `offline` answers the
    request without a tool where a model can (arithmetic, a joke)."""

    key: str
    domain: str
    groups: tuple[str, ...]
    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    params: tuple[Param, ...]
    asks: tuple[Ask, ...]
    result: Result
    ability: str
    noun: str
    tip: str
    make: Callable[[random.Random], dict[str, Any]] | None = None
    offline: Callable[[random.Random, dict[str, Any]], str] | None = None


def P(slot: str, names: str, type: str, desc: str, enum: tuple[str, ...] = (), required: bool = True) -> Param:
    return Param(slot, tuple(names.split()), type, desc, enum, required)


def _fmt(template: str, v: dict[str, Any], **more: Any) -> str:
    return template.format(**v, **more)


def _value(key: str, gen: Callable[[random.Random, dict[str, Any]], Any], *answers: str) -> Result:
    """A lookup's result: `{key: x}`, and an answer that states x."""
    def result(rng: random.Random, v: dict[str, Any]) -> tuple[dict[str, Any], str]:
        x = gen(rng, v)
        return {key: x}, _fmt(rng.choice(answers), v, x=x)
    return result


def _done(*answers: str) -> Result:
    """An action's result: a status and an id, and an answer that confirms it."""
    def result(rng: random.Random, v: dict[str, Any]) -> tuple[dict[str, Any], str]:
        return {"status": "ok", "id": str(rng.randint(1000, 99999))}, _fmt(rng.choice(answers), v)
    return result


def _num(lo: float, hi: float, digits: int = 2) -> Callable[[random.Random, dict[str, Any]], float]:
    return lambda r, v: round(r.uniform(lo, hi), digits)


def _int(lo: int, hi: int) -> Callable[[random.Random, dict[str, Any]], int]:
    return lambda r, v: r.randint(lo, hi)


def _pick(items: list[Any]) -> Callable[[random.Random, dict[str, Any]], Any]:
    return lambda r, v: r.choice(items)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def arithmetic(expr: str) -> float:
    """The value of an arithmetic expression of numbers, + - * / and brackets (parsed, never eval'd)."""
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"not plain arithmetic: {expr!r}")
    return walk(ast.parse(expr, mode="eval"))


def _nice(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(x, 2)


def _make_expr(rng: random.Random) -> dict[str, Any]:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    expr = rng.choice([f"{a} + {b}", f"{a} * {c}", f"{a} - {b}", f"({a} + {b}) * {c}", f"{a * c} / {c}",
                       f"{a} * {b} - {c}", f"{a}.5 + {b}"])
    return {"expr": expr}


def _make_units(rng: random.Random) -> dict[str, Any]:
    src, dst = rng.choice(list(UNIT_FACTORS))
    return {"value": rng.choice([1, 3, 5, 10, 12, 26.2, 42, 65, 100, 2.5, 180, 37]), "unit": src, "unit2": dst}


def convert_units(value: float, src: str, dst: str) -> float:
    """`value` in `src` units expressed in `dst` units (2 decimals)."""
    factor = UNIT_FACTORS[(src, dst)]
    if factor is not None:
        return round(value * factor, 2)
    return round(value * 9 / 5 + 32 if src == "celsius" else (value - 32) * 5 / 9, 2)


def _make_translation(rng: random.Random) -> dict[str, Any]:
    phrase = rng.choice(list(PHRASES))
    return {"phrase": phrase, "lang": rng.choice(list(PHRASES[phrase]))}


def _make_range(rng: random.Random) -> dict[str, Any]:
    lo = rng.choice([0, 1, 1, 10, 50, 100])
    return {"lo": lo, "hi": lo + rng.choice([6, 10, 20, 50, 100, 1000])}


def _payment(principal: float, rate: float, years: int) -> float:
    r, n = rate / 100 / 12, years * 12
    return round(principal * r / (1 - (1 + r) ** -n), 2)


def _bmi(v: dict[str, Any]) -> float:
    return round(v["body_kg"] / (v["height_cm"] / 100) ** 2, 1)


def _password(rng: random.Random, v: dict[str, Any]) -> tuple[dict[str, Any], str]:
    p = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(v["length"]))
    return {"password": p}, f"Here is your password: {p}"


def _random_number(rng: random.Random, v: dict[str, Any]) -> tuple[dict[str, Any], str]:
    x = rng.randint(v["lo"], v["hi"])
    return {"number": x}, f"Your number is {x}."


def _weather(rng: random.Random, v: dict[str, Any]) -> tuple[dict[str, Any], str]:
    t, cond = rng.randint(-5, 35), rng.choice(["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"])
    unit = "F" if v.get("units") == "fahrenheit" else "C"
    t = round(t * 9 / 5 + 32) if unit == "F" else t
    return {"temperature": t, "unit": unit, "condition": cond}, f"It's {cond} and {t} degrees {unit} in {v['city']}."


_C = ("celsius", "fahrenheit")
ARCHETYPES: list[Archetype] = [
    # -- money -------------------------------------------------------------------------------------
    Archetype(
        "stock_price", "stocks", ("money", "markets"),
        ("get_stock_price", "stock_quote", "getStockPrice", "quote", "fetch_share_price", "stocks_lookup"),
        ("Get the latest trading price of a stock.", "Returns a real-time stock quote.", "Look up a share price."),
        (P("ticker", "symbol ticker stock stock_symbol", "string", "Ticker symbol, e.g. AAPL"),),
        ("What's the stock price of {ticker}?", "How is {ticker} trading right now?", "{ticker} share price",
         "Get me a quote for {ticker}.", "Can you check the current price of {ticker} stock?",
         "I own some {ticker}. What's one share worth today?", "price of {ticker} stock please",
         "Where is {ticker} trading at the moment?"),
        _value("price", _num(5, 900), "{ticker} is trading at {x} USD.", "One share of {ticker} costs {x} USD now."),
        "look up live stock prices", "stock price", "a finance app or your broker will show the live quote."),
    Archetype(
        "crypto_price", "crypto", ("money", "markets"),
        ("get_crypto_price", "crypto_quote", "getCoinPrice", "coin_price", "cryptocurrency_price_lookup"),
        ("Current price of a cryptocurrency.", "Look up what a coin is worth.", "Crypto market price."),
        (P("coin", "coin symbol crypto asset", "string", "Coin symbol or name, e.g. BTC"),
         P("cur", "currency vs_currency quote_currency", "string", "Currency to price in", required=False)),
        ("What's {coin} worth right now?", "Price of {coin}?", "How much is one {coin} in {cur}?",
         "Check the {coin} price in {cur}.", "current {coin} price", "Is {coin} up today? Tell me the price.",
         "what does {coin} cost in {cur} at the moment"),
        _value("price", _num(0.1, 70000), "{coin} is at {x} right now.", "One {coin} costs {x}."),
        "check cryptocurrency prices", "crypto price", "an exchange or price site will have the live number."),
    Archetype(
        "fx_rate", "fx", ("money", "convert"),
        ("get_exchange_rate", "exchange_rate", "fx_rate", "getExchangeRate", "currency_rate_lookup"),
        ("Get the exchange rate between two currencies.", "Latest FX rate for a currency pair."),
        (P("cur", "base from_currency source base_currency", "string", "Base currency code"),
         P("cur2", "target to_currency quote symbols", "string", "Target currency code")),
        ("What's the exchange rate from {cur} to {cur2}?", "{cur} to {cur2} rate?",
         "How many {cur2} do I get for one {cur}?", "Show the current {cur}/{cur2} exchange rate.",
         "I'm travelling soon. What is the {cur} {cur2} rate today?"),
        _value("rate", _num(0.01, 150, 4), "1 {cur} = {x} {cur2}.", "The {cur} to {cur2} rate is {x}."),
        "check exchange rates", "currency", "your bank or a currency site will show today's rate."),
    Archetype(
        "currency_convert", "fx", ("money", "convert"),
        ("currency_converter", "convert_currency", "convertCurrency", "money_convert", "fx_convert",
         "currency_exchange"),
        ("Convert an amount of money from one currency to another.", "Currency conversion at today's rate."),
        (P("amount", "amount value sum quantity", "number", "Amount to convert"),
         P("cur", "from from_currency source_currency base", "string", "Currency code to convert from"),
         P("cur2", "to to_currency target_currency target", "string", "Currency code to convert to")),
        ("Convert {amount} {cur} to {cur2}.", "How much is {amount} {cur} in {cur2}?",
         "I have {amount} {cur}. What is that in {cur2}?", "{amount} {cur} to {cur2} please",
         "What would {amount} {cur} be worth in {cur2}?", "convert {amount} {cur} into {cur2}",
         "My hotel costs {amount} {cur}. How much is that in {cur2}?"),
        _value("converted", _num(1, 500000), "{amount} {cur} is {x} {cur2}.", "That comes to {x} {cur2}."),
        "convert currencies at live rates", "currency", "a bank or currency site will give today's rate."),
    Archetype(
        "loan_payment", "loans", ("money",),
        ("loan_calculator", "calculate_loan_payment", "mortgage_payment", "getLoanPayment", "monthly_payment"),
        ("Monthly payment for a fixed-rate loan.", "Calculates mortgage or loan repayments."),
        (P("principal", "principal loan_amount amount", "number", "Amount borrowed"),
         P("rate", "rate interest_rate annual_rate apr", "number", "Annual interest rate in percent"),
         P("years", "years term_years term", "integer", "Loan term in years")),
        ("What's the monthly payment on a {principal} loan at {rate}% over {years} years?",
         "Calculate my mortgage: {principal} borrowed, {rate} percent interest, {years} years.",
         "If I borrow {principal} for {years} years at {rate}%, what do I pay each month?",
         "loan of {principal}, {rate}% APR, {years} years. monthly payment?"),
        lambda r, v: ({"monthly_payment": _payment(v["principal"], v["rate"], v["years"])},
                      f"The monthly payment would be {_payment(v['principal'], v['rate'], v['years'])}."),
        "calculate loan payments", "loan calculator", "your bank's loan calculator can work it out."),
    Archetype(
        "bank_transfer", "transfer", ("money", "banking"),
        ("transfer_money", "send_payment", "bank_transfer", "makeTransfer", "wire_funds", "pay"),
        ("Send money from the user's account to a person.", "Transfer funds to a recipient."),
        (P("amount", "amount value sum", "number", "Amount to send"),
         P("person", "recipient to payee name", "string", "Who receives the money"),
         P("cur", "currency currency_code", "string", "Currency code", required=False)),
        ("Send {amount} to {person}.", "Transfer {amount} {cur} to {person}.", "Pay {person} {amount} {cur} please.",
         "I owe {person} {amount}. Please send it.", "send {person} {amount} {cur}"),
        _done("Done. {amount} is on its way to {person}.", "I sent {amount} to {person}."),
        "move money between accounts", "banking", "your bank's app can make the transfer."),
    Archetype(
        "account_balance", "balance", ("money", "banking"),
        ("get_account_balance", "check_balance", "balance", "getBalance", "account_summary"),
        ("Returns the balance of one of the user's bank accounts.", "Check how much money is in an account."),
        (P("account", "account account_type type", "string", "Which account",
           ("checking", "savings", "credit")),),
        ("What's my {account} balance?", "How much is in my {account} account?", "check {account} account balance",
         "Do I have enough in {account}? Show me the balance."),
        _value("balance", _num(10, 20000), "Your {account} balance is {x}.", "You have {x} in {account}."),
        "see your bank balance", "banking", "your bank's app will show it."),
    # -- travel ------------------------------------------------------------------------------------
    Archetype(
        "flight_search", "flights", ("travel",),
        ("search_flights", "find_flights", "flight_search", "searchFlights", "flights", "lookup_flights"),
        ("Search for flights between two airports on a date.", "Find available flights."),
        (P("airport", "origin from departure_airport source", "string", "Origin airport code"),
         P("airport2", "destination to arrival_airport dest", "string", "Destination airport code"),
         P("date", "date departure_date depart_on", "string", "Departure date, YYYY-MM-DD"),
         P("small", "passengers adults travelers", "integer", "Number of passengers", required=False)),
        ("Find flights from {airport} to {airport2} on {date}.",
         "Any flights {airport} to {airport2} on {date} for {small} people?",
         "I need to fly from {airport} to {airport2} on {date}.",
         "Search {airport} -> {airport2}, departing {date}, {small} passengers.",
         "flights {airport} {airport2} {date}"),
        _value("cheapest_fare", _num(60, 1500), "The cheapest flight from {airport} to {airport2} on {date} is {x}.",
               "I found flights from {x} on {date}."),
        "search for flights", "flight search", "an airline or travel site can show options."),
    Archetype(
        "flight_status", "flight_status", ("travel",),
        ("get_flight_status", "flight_status", "flightTracker", "check_flight", "track_flight"),
        ("Live status of a flight by its number.", "Tells whether a flight is on time, delayed or landed."),
        (P("flight", "flight_number flight flight_id flight_code", "string", "Flight number, e.g. BA117"),),
        ("Is flight {flight} on time?", "What's the status of {flight}?", "track flight {flight}",
         "My mom is on {flight}. Has it landed?", "Any delay on {flight} today?"),
        _value("status", _pick(["on time", "delayed 40 minutes", "landed", "boarding", "departed"]),
               "Flight {flight} is {x}.", "{flight}: {x}."),
        "track flights", "flight tracking", "the airline's website shows live status."),
    Archetype(
        "hotel_search", "hotels", ("travel",),
        ("search_hotels", "find_hotels", "hotels", "hotelSearch", "lodging_lookup"),
        ("Search hotels in a city for given dates.", "Find places to stay."),
        (P("city", "city location destination", "string", "City to stay in"),
         P("date", "check_in checkin arrival_date", "string", "Check-in date, YYYY-MM-DD"),
         P("nights", "nights num_nights length_of_stay", "integer", "Number of nights"),
         P("small", "guests adults people", "integer", "Number of guests", required=False)),
        ("Find a hotel in {city} from {date} for {nights} nights.",
         "I need a room in {city}, checking in {date}, {nights} nights, {small} guests.",
         "Hotels in {city} on {date} for {nights} nights?",
         "Look for a place to stay in {city}: {nights} nights starting {date}."),
        _value("hotels_found", _int(3, 60), "I found {x} hotels in {city} from {date}.",
               "There are {x} options in {city} for {nights} nights."),
        "search hotels", "hotel booking", "a booking site will list rooms."),
    Archetype(
        "train_search", "trains", ("travel",),
        ("search_trains", "train_times", "find_train", "getTrainSchedule", "rail_search"),
        ("Train connections between two cities.", "Look up train departures."),
        (P("city", "from origin departure_station", "string", "Departure city"),
         P("city2", "to destination arrival_station", "string", "Arrival city"),
         P("date", "date travel_date", "string", "Date, YYYY-MM-DD"),
         P("time", "after depart_after time", "string", "Earliest departure, HH:MM", required=False)),
        ("When are the trains from {city} to {city2} on {date}?",
         "Train from {city} to {city2} on {date} after {time}?", "Find me a train {city} to {city2}, {date}.",
         "I want to go by rail from {city} to {city2} on {date}, leaving after {time}."),
        _value("first_departure", lambda r, v: _time(r), "The first train from {city} to {city2} leaves at {x}.",
               "There's a train at {x} on {date}."),
        "look up train times", "train timetable", "the rail operator's site has the timetable."),
    Archetype(
        "ride_hail", "rides", ("travel", "transport"),
        ("request_ride", "book_ride", "call_taxi", "requestRide", "order_cab", "ride"),
        ("Request a car to pick the user up.", "Book a taxi or ride."),
        (P("place", "pickup pickup_location from origin", "string", "Pickup address"),
         P("place2", "destination dropoff to", "string", "Drop-off address"),
         P("ride_type", "ride_type car_type tier", "string", "Kind of car", ("standard", "xl", "premium"),
           required=False)),
        ("Get me a ride from {place} to {place2}.", "Book a {ride_type} car from {place} to {place2}.",
         "I need a taxi to {place2}, pick me up at {place}.", "Call a cab from {place} to {place2} please.",
         "order a {ride_type} ride, {place} to {place2}"),
        _done("Your ride from {place} to {place2} is booked.", "A car is on its way to {place}."),
        "book rides", "ride booking", "a taxi or ride app can send a car."),
    Archetype(
        "parking", "parking", ("travel", "transport"),
        ("find_parking", "parking_search", "findParking", "parking_spots", "get_parking"),
        ("Find parking near a location.", "Search for open parking spots."),
        (P("place", "location near address", "string", "Where to park"),
         P("hours", "hours duration_hours duration", "integer", "How long, in hours", required=False)),
        ("Find parking near {place}.", "Where can I park near {place} for {hours} hours?",
         "parking spots around {place}?", "I'm driving to {place}. Is there parking nearby?"),
        _value("spots_available", _int(1, 80), "There are {x} open spots near {place}.",
               "I found {x} parking spots near {place}."),
        "find parking", "parking", "a parking app will show free spots."),
    Archetype(
        "directions", "maps", ("travel", "transport"),
        ("get_directions", "directions", "route_planner", "getRoute", "navigate", "maps_directions"),
        ("Directions between two places.", "Plan a route from A to B."),
        (P("place", "origin from start start_location", "string", "Starting point"),
         P("place2", "destination to end end_location", "string", "Where to go"),
         P("mode", "mode travel_mode transport", "string", "How to travel",
           ("driving", "walking", "transit", "cycling"), required=False)),
        ("How do I get from {place} to {place2}?", "Give me {mode} directions from {place} to {place2}.",
         "Route from {place} to {place2}, {mode} please.", "navigate to {place2} from {place}",
         "What's the {mode} route from {place} to {place2}?"),
        _value("duration_minutes", _int(4, 90), "From {place} to {place2} takes about {x} minutes.",
               "The route to {place2} takes {x} minutes."),
        "give turn-by-turn directions", "maps", "a maps app will plan the route."),
    Archetype(
        "nearby_places", "places", ("travel",),
        ("find_nearby", "search_places", "places_nearby", "findPlaces", "local_search"),
        ("Find places of a given kind in a city.", "Local business search."),
        (P("ptype", "query category place_type keyword", "string", "What kind of place"),
         P("city", "location city near", "string", "City or area")),
        ("Find a {ptype} in {city}.", "Is there a {ptype} in {city}?", "{ptype} near {city}",
         "I'm in {city} and need a {ptype}.", "where's the closest {ptype} in {city}"),
        _value("results", _int(1, 25), "I found {x} places matching {ptype} in {city}.",
               "There are {x} results for {ptype} in {city}."),
        "search for nearby places", "local search", "a maps app will show what's close."),
    Archetype(
        "holidays", "holidays", ("travel", "calendar"),
        ("get_holidays", "public_holidays", "holiday_calendar", "getHolidays"),
        ("Public holidays of a country in a year.", "List national holidays."),
        (P("country", "country country_name", "string", "Country name"),
         P("year", "year", "integer", "Year")),
        ("What are the public holidays in {country} in {year}?", "holidays {country} {year}",
         "How many public holidays does {country} have in {year}?"),
        _value("count", _int(8, 16), "{country} has {x} public holidays in {year}.",
               "There are {x} holidays in {country} in {year}."),
        "look up public holidays", "holiday calendar", "a government website lists them."),
    # -- weather and time ----------------------------------------------------------------------------
    Archetype(
        "weather_current", "weather", ("info", "outdoors"),
        ("get_weather", "weather_lookup", "current_weather", "getWeather", "weather", "check_weather"),
        ("Current weather conditions for a city.", "Get the weather right now.", "Live temperature and sky."),
        (P("city", "location city place q", "string", "City name"),
         P("units", "units unit temperature_unit", "string", "Temperature unit", _C, required=False)),
        ("What's the weather in {city}?", "How hot is it in {city} right now in {units}?", "weather {city}",
         "Is it raining in {city}?", "Tell me the current temperature in {city} in {units}.",
         "I'm flying to {city} tonight. What's the weather like there?", "how's the weather over in {city}"),
        _weather,
        "check live weather", "weather", "a weather app will have the latest conditions."),
    Archetype(
        "weather_forecast", "weather", ("info", "outdoors"),
        ("get_forecast", "weather_forecast", "forecast", "getForecast", "forecast_lookup"),
        ("Weather forecast for the coming days.", "Multi-day forecast for a city."),
        (P("city", "city location", "string", "City name"),
         P("days", "days num_days horizon", "integer", "How many days ahead")),
        ("What's the forecast for {city} for the next {days} days?", "{days}-day forecast for {city}",
         "Will it rain in {city} this week? Give me {days} days.", "forecast {city}, {days} days"),
        _value("rainy_days", _int(0, 3), "Over the next {days} days, {city} expects {x} rainy days.",
               "The {days}-day forecast for {city} shows {x} days of rain."),
        "get weather forecasts", "weather", "a weather service will have the forecast."),
    Archetype(
        "local_time", "clock", ("time", "info"),
        ("get_local_time", "time_in_city", "world_clock", "getTime", "current_time", "timezone_lookup"),
        ("Current local time in a city.", "World clock lookup."),
        (P("city", "city location timezone place", "string", "City name"),),
        ("What time is it in {city}?", "Current local time in {city}?", "time in {city} right now",
         "I need to call someone in {city}. What time is it there?"),
        _value("local_time", lambda r, v: _time(r), "It's {x} in {city}.", "The local time in {city} is {x}."),
        "check the time in other cities", "world clock", "your phone's world clock can show it."),
    Archetype(
        "timer", "timer", ("time", "device"),
        ("set_timer", "start_timer", "timer", "setTimer", "countdown"),
        ("Start a countdown timer.", "Set a timer for some minutes."),
        (P("minutes", "minutes duration_minutes duration mins", "integer", "Length in minutes"),
         P("label", "label name title", "string", "What the timer is for", required=False)),
        ("Set a timer for {minutes} minutes.", "Start a {minutes} minute timer for the {label}.",
         "timer {minutes} min", "Can you set a {minutes}-minute timer called {label}?",
         "{minutes} minutes on the clock please"),
        _done("Timer set for {minutes} minutes.", "Your {minutes}-minute timer is running."),
        "set timers", "timer", "your phone's clock app can do it."),
    Archetype(
        "alarm", "alarm", ("time", "device"),
        ("set_alarm", "create_alarm", "alarm", "setAlarm", "wake_up_alarm"),
        ("Set an alarm at a time of day.", "Creates an alarm."),
        (P("time", "time alarm_time at", "string", "Time, HH:MM"),
         P("label", "label name", "string", "Alarm label", required=False),
         P("repeat", "repeat daily recurring", "boolean", "Repeat every day", required=False)),
        ("Set an alarm for {time}.", "Wake me up at {time}.", ("Set a daily alarm at {time}.", {"repeat": True}),
         "alarm at {time} labeled {label}", ("Set an alarm at {time} every day called {label}.", {"repeat": True})),
        _done("Alarm set for {time}.", "Okay, your alarm is set for {time}."),
        "set alarms", "alarm", "your phone's clock app can set one."),
    Archetype(
        "reminder", "tasks", ("time", "productivity"),
        ("create_reminder", "remind_me", "add_reminder", "setReminder", "reminders_create"),
        ("Create a reminder for a date and time.", "Reminds the user about something."),
        (P("task", "text title what message", "string", "What to be reminded of"),
         P("date", "date day due_date", "string", "Date, YYYY-MM-DD"),
         P("time", "time at", "string", "Time, HH:MM", required=False)),
        ("Remind me to {task} on {date}.", "Set a reminder on {date} at {time} to {task}.",
         "Please remind me at {time} on {date}: {task}.", "Don't let me forget to {task} on {date}.",
         "reminder {date}: {task}"),
        _done("I'll remind you to {task} on {date}.", "Reminder saved for {date}."),
        "set reminders", "reminder", "your phone's reminders app can do it."),
    Archetype(
        "calendar_create", "calendar", ("time", "productivity"),
        ("create_event", "add_calendar_event", "schedule_meeting", "createEvent", "calendar_add", "new_event"),
        ("Add an event to the user's calendar.", "Schedule a calendar entry."),
        (P("event", "title name summary event_name", "string", "Event title"),
         P("date", "date day", "string", "Date, YYYY-MM-DD"),
         P("time", "time start_time start", "string", "Start time, HH:MM"),
         P("minutes", "duration_minutes duration length", "integer", "Length in minutes", required=False)),
        ("Add {event} to my calendar on {date} at {time}.",
         "Schedule {event} for {date} at {time}, {minutes} minutes.", "Put '{event}' on {date} at {time}.",
         "Create an event called {event} on {date} at {time}.", "{event} on {date} at {time}, add it please"),
        _done("{event} is on your calendar for {date} at {time}.", "Added {event} on {date}."),
        "add calendar events", "calendar", "your calendar app can add it."),
    Archetype(
        "calendar_list", "agenda", ("time", "productivity"),
        ("list_events", "get_agenda", "calendar_events", "getSchedule", "agenda"),
        ("List the user's calendar events on a date.", "Show the agenda for a day."),
        (P("date", "date day", "string", "Date, YYYY-MM-DD"),),
        ("What's on my calendar on {date}?", "Do I have anything on {date}?", "Show my agenda for {date}.",
         "am I free on {date}"),
        _value("events", _int(0, 5), "You have {x} events on {date}.", "There are {x} things on {date}."),
        "read your calendar", "calendar", "your calendar app will show the day."),
    # -- productivity ---------------------------------------------------------------------------------
    Archetype(
        "note", "notes", ("productivity",),
        ("create_note", "add_note", "notes", "saveNote", "new_note", "jot_down"),
        ("Save a text note.", "Create a note in the user's notebook."),
        (P("message", "content text body note", "string", "Note text"),
         P("note_title", "title name heading", "string", "Note title", required=False)),
        ("Make a note: {message}", "Save a note titled {note_title} that says {message}",
         "Note this down: {message}", "write down '{message}' in my {note_title} note", "new note - {message}"),
        _done("Saved your note.", "Note saved."),
        "save notes", "notes", "your notes app can keep it."),
    Archetype(
        "todo", "tasks", ("productivity",),
        ("add_task", "create_todo", "todo_add", "addTask", "tasks", "new_task"),
        ("Add an item to the to-do list.", "Create a task."),
        (P("task", "task title item description", "string", "What needs doing"),
         P("date", "due due_date deadline", "string", "Due date, YYYY-MM-DD", required=False),
         P("priority", "priority importance", "string", "Priority", ("low", "medium", "high"), required=False)),
        ("Add '{task}' to my to-do list.", "New task: {task}, due {date}.",
         "Add a {priority} priority task to {task} by {date}.", "put {task} on my todo list",
         "I need to {task}. Add it as {priority} priority."),
        _done("Added '{task}' to your list.", "Task created: {task}."),
        "manage your to-do list", "task", "your to-do app can hold it."),
    Archetype(
        "file_search", "files", ("productivity",),
        ("search_files", "find_file", "file_search", "searchDocuments", "drive_search", "locate_file"),
        ("Search the user's files by name.", "Find documents in cloud storage."),
        (P("file", "query name filename search_term", "string", "File name or words in it"),),
        ("Find the file {file}.", "Where did I save {file}?", "search my drive for {file}",
         "I can't find my {file}. Can you look for it?"),
        _value("matches", _int(1, 4), "I found {x} files matching {file}.", "{x} results for {file}."),
        "search your files", "file search", "your computer's search can find it."),
    Archetype(
        "password", "password", ("security",),
        ("generate_password", "password_generator", "makePassword", "random_password"),
        ("Generate a random password.", "Creates a strong password."),
        (P("length", "length size num_chars", "integer", "Number of characters"),
         P("symbols", "include_symbols symbols use_symbols", "boolean", "Include symbols", required=False)),
        ("Generate a {length}-character password.",
         ("Make me a password with {length} characters, symbols included.", {"symbols": True}),
         "new password, length {length}", ("Give me a {length} character password without symbols.",
                                            {"symbols": False})),
        _password,
        "generate passwords", "password generator", "a password manager can make one."),
    # -- communication -------------------------------------------------------------------------------
    Archetype(
        "contact", "contacts", ("comms",),
        ("find_contact", "lookup_contact", "get_contact", "contacts_search", "getContactInfo"),
        ("Look up a person in the user's contacts.", "Returns phone and email of a contact."),
        (P("fullname", "name contact_name full_name query", "string", "Person's name"),),
        ("What's the phone number for {fullname}?", "Find the contact info for {fullname}.",
         "Look up {fullname} in my contacts.", "Do I have an email for {fullname}?"),
        _value("phone", lambda r, v: VALUES["phone"](r), "{fullname}'s number is {x}.", "You can reach them at {x}."),
        "look up your contacts", "contacts", "your phone's contacts app has it."),
    Archetype(
        "sms", "messaging", ("comms",),
        ("send_sms", "send_text", "text_message", "sendSMS", "sms"),
        ("Send a text message to a phone number.", "SMS sender."),
        (P("phone", "phone_number to number recipient", "string", "Phone number"),
         P("message", "message text body content", "string", "Message text")),
        ("Text {phone} saying {message}", "Send an SMS to {phone}: {message}", "Send '{message}' to {phone} by text.",
         "text this to {phone}: {message}"),
        _done("Text sent to {phone}.", "Your message to {phone} was sent."),
        "send text messages", "messaging", "you can send it from your phone."),
    Archetype(
        "chat_message", "messaging", ("comms",),
        ("send_message", "sendMessage", "post_message", "chat_send", "slack_post", "message"),
        ("Send a chat message to a person.", "Post a direct message."),
        (P("person", "recipient to user contact", "string", "Who to message"),
         P("message", "text message body content", "string", "Message text")),
        ("Message {person}: {message}", "Tell {person} '{message}' on chat.",
         "Send {person} a message saying {message}", "Can you ping {person} and say {message}?",
         "dm {person}: {message}"),
        _done("Sent to {person}.", "Your message to {person} is delivered."),
        "send chat messages", "messaging", "your chat app can send it."),
    Archetype(
        "email", "email", ("comms",),
        ("send_email", "email", "compose_email", "sendEmail", "mail_send"),
        ("Send an email.", "Compose and send an email message."),
        (P("email", "to recipient email_address address", "string", "Recipient address"),
         P("subject", "subject title", "string", "Subject line"),
         P("message", "body text content", "string", "Email body", required=False)),
        ("Email {email} with the subject {subject}.", "Send an email to {email}, subject '{subject}', saying {message}",
         "Write to {email} about {subject}: {message}", "mail {email}, subject: {subject}"),
        _done("Email sent to {email}.", "Your email '{subject}' went out."),
        "send email", "email", "your mail app can send it."),
    # -- language --------------------------------------------------------------------------------------
    Archetype(
        "translate", "translate", ("language",),
        ("translate", "translate_text", "translator", "translateText", "get_translation", "language_translate"),
        ("Translate text into another language.", "Machine translation."),
        (P("phrase", "text source_text q input", "string", "Text to translate"),
         P("lang", "target_language target to language target_lang", "string", "Language to translate into")),
        ("Translate '{phrase}' into {lang}.", "How do you say '{phrase}' in {lang}?", "{lang} for '{phrase}'?",
         "Can you translate {phrase} to {lang}?", "I'm visiting soon. What's '{phrase}' in {lang}?"),
        lambda r, v: ({"translation": PHRASES[v["phrase"]][v["lang"]]},
                      f"In {v['lang']}: {PHRASES[v['phrase']][v['lang']]}."),
        "translate reliably", "translation", "a translation app will help.", make=_make_translation,
        offline=lambda r, v: f"In {v['lang']}, \"{v['phrase']}\" is \"{PHRASES[v['phrase']][v['lang']]}\"."),
    Archetype(
        "dictionary", "dictionary", ("language",),
        ("define_word", "dictionary_lookup", "define", "getDefinition", "word_meaning"),
        ("Dictionary definition of a word.", "Look up what a word means."),
        (P("word", "word term query", "string", "The word"),),
        ("What does {word} mean?", "Define {word}.", "definition of {word}",
         "I saw the word '{word}' in a book. What does it mean?"),
        lambda r, v: ({"definition": DEFINITIONS[v["word"]]},
                      f"{v['word'].capitalize()} means {DEFINITIONS[v['word']]}."),
        "look up dictionary entries", "dictionary", "a dictionary site will have it.",
        offline=lambda r, v: f"{v['word'].capitalize()} means {DEFINITIONS[v['word']]}."),
    Archetype(
        "spelling", "spelling", ("language",),
        ("check_spelling", "spell_check", "spellcheck", "checkSpelling", "proofread"),
        ("Check and correct spelling.", "Spell checker."),
        (P("misspelled", "text word input", "string", "Text to check"),),
        ("Is '{misspelled}' spelled right?", "Spell check this: {misspelled}", "how do I spell {misspelled} properly?",
         "check the spelling of {misspelled}"),
        lambda r, v: ({"correction": MISSPELLED[v["misspelled"]]},
                      f"The correct spelling is {MISSPELLED[v['misspelled']]}."),
        "run a spell checker", "spelling", "",
        offline=lambda r, v: f"It's spelled {MISSPELLED[v['misspelled']]}."),
    # -- numbers ---------------------------------------------------------------------------------------
    Archetype(
        "unit_convert", "units", ("math", "convert"),
        ("unit_converter", "convert_units", "convertUnits", "units", "measurement_convert", "unit_conversion"),
        ("Convert a measurement between units.", "Unit conversion for length, weight, volume and temperature."),
        (P("value", "value amount quantity number", "number", "The number to convert"),
         P("unit", "from_unit from source_unit unit_from", "string", "Unit to convert from"),
         P("unit2", "to_unit to target_unit unit_to", "string", "Unit to convert to")),
        ("Convert {value} {unit} to {unit2}.", "How many {unit2} is {value} {unit}?", "{value} {unit} in {unit2}?",
         "What's {value} {unit} in {unit2}? It's for a recipe.", "convert {value} {unit} into {unit2} please"),
        lambda r, v: ({"result": convert_units(v["value"], v["unit"], v["unit2"])},
                      f"{v['value']} {v['unit']} is {convert_units(v['value'], v['unit'], v['unit2'])} {v['unit2']}."),
        "convert units", "unit converter", "", make=_make_units,
        offline=lambda r, v: f"{v['value']} {v['unit']} is about {convert_units(v['value'], v['unit'], v['unit2'])} "
                             f"{v['unit2']}."),
    Archetype(
        "calculator", "calculator", ("math",),
        ("calculate", "calculator", "evaluate_expression", "evalMath", "math_eval", "compute"),
        ("Evaluate an arithmetic expression.", "A calculator."),
        (P("expr", "expression expr formula input", "string", "Arithmetic expression"),),
        ("What is {expr}?", "Calculate {expr}.", "compute {expr}", "Can you work out {expr} for me?", "{expr} = ?"),
        lambda r, v: ({"result": _nice(arithmetic(v["expr"]))}, f"{v['expr']} = {_nice(arithmetic(v['expr']))}."),
        "run a calculator", "calculator", "", make=_make_expr,
        offline=lambda r, v: f"{v['expr']} = {_nice(arithmetic(v['expr']))}."),
    Archetype(
        "random_number", "random", ("math", "fun"),
        ("random_number", "random_int", "rng", "getRandomNumber", "pick_number"),
        ("Pick a random whole number in a range.", "Random number generator."),
        (P("lo", "min minimum low start", "integer", "Smallest value"),
         P("hi", "max maximum high end", "integer", "Largest value")),
        ("Pick a random number between {lo} and {hi}.", "random number from {lo} to {hi}",
         "Give me a number from {lo} to {hi}, at random."),
        _random_number,
        "draw true random numbers", "random number", "", make=_make_range,
        offline=lambda r, v: f"How about {r.randint(v['lo'], v['hi'])}?"),
    # -- media -----------------------------------------------------------------------------------------
    Archetype(
        "play_music", "music", ("media",),
        ("play_music", "play_song", "playSong", "music_play", "spotify_play", "play"),
        ("Play a song on the user's speaker.", "Start music playback."),
        (P("song", "song track title query", "string", "Song title"),
         P("artist", "artist by performer", "string", "Artist name", required=False)),
        ("Play {song}.", "Put on {song} by {artist}.", "I want to hear {song}.", "play {song} by {artist} please"),
        _done("Playing {song}.", "Now playing: {song}."),
        "play music", "music", "your music app can play it."),
    Archetype(
        "podcasts", "podcasts", ("media",),
        ("search_podcasts", "find_podcast", "podcast_search", "getPodcasts", "podcasts"),
        ("Search podcasts by topic.", "Find podcast shows."),
        (P("pod_topic", "topic query keyword genre", "string", "Topic"),
         P("limit", "limit max_results count", "integer", "How many results", required=False)),
        ("Find podcasts about {pod_topic}.", "Recommend {limit} podcasts on {pod_topic}.",
         "any good {pod_topic} podcasts?", "search for a podcast on {pod_topic}"),
        _value("results", _int(3, 30), "I found {x} podcasts about {pod_topic}.", "{x} shows match {pod_topic}."),
        "search podcasts", "podcast", "a podcast app will have recommendations."),
    Archetype(
        "showtimes", "showtimes", ("media",),
        ("get_showtimes", "movie_showtimes", "find_showtimes", "getShowtimes", "cinema_times"),
        ("Cinema showtimes for a movie in a city.", "When a film is playing nearby."),
        (P("movie", "movie title film", "string", "Movie title"),
         P("city", "city location", "string", "City"),
         P("date", "date day", "string", "Date, YYYY-MM-DD", required=False)),
        ("When is {movie} playing in {city}?", "Showtimes for {movie} in {city} on {date}?",
         "I want to see {movie} in {city}. When can I go?", "{movie} showtimes {city} {date}"),
        _value("next_showing", lambda r, v: _time(r), "{movie} plays next at {x} in {city}.",
               "The next showing of {movie} is at {x}."),
        "check cinema showtimes", "cinema listings", "the cinema's website lists them."),
    Archetype(
        "movie_info", "movie_info", ("media",),
        ("get_movie_info", "movie_details", "film_lookup", "getMovie", "imdb_search"),
        ("Ratings and details of a movie.", "Look up a film."),
        (P("movie", "title movie name query", "string", "Movie title"),),
        ("What's {movie} rated?", "Is {movie} any good? Check the rating.", "Look up {movie} and give me its rating.",
         "rating for {movie}"),
        _value("rating", _num(5, 9.5, 1), "{movie} is rated {x} out of 10.", "{movie} has a {x}/10 rating."),
        "look up movie ratings", "movie database", "a movie site will have reviews."),
    Archetype(
        "book_search", "books", ("media",),
        ("search_books", "find_book", "book_lookup", "searchBooks", "library_search", "books"),
        ("Search a book catalogue by title.", "Find a book and its author."),
        (P("book", "title query book_title name", "string", "Book title"),),
        ("Find the book {book}.", "Is {book} available at the library?", "look up {book}",
         "Search for {book} and tell me who wrote it."),
        lambda r, v: ({"author": BOOKS[v["book"]], "available": True},
                      f"{v['book']} by {BOOKS[v['book']]} is available."),
        "search library catalogues", "book search", "your library's website can check."),
    # -- information -----------------------------------------------------------------------------------
    Archetype(
        "sports", "sports", ("info",),
        ("get_scores", "sports_scores", "live_score", "getScore", "match_result", "scores"),
        ("Latest game result for a team.", "Sports scores."),
        (P("team", "team team_name club", "string", "Team name"),
         P("date", "date game_date", "string", "Game date, YYYY-MM-DD", required=False)),
        ("Did {team} win last night?", "What was the score of the {team} game on {date}?", "{team} score?",
         "How did {team} do?", "result of the {team} match on {date}"),
        _value("score", lambda r, v: f"{r.randint(0, 5)}-{r.randint(0, 5)}", "{team}'s last game ended {x}.",
               "Final score for {team}: {x}."),
        "check live scores", "sports", "a sports app will have the result."),
    Archetype(
        "news", "news", ("info",),
        ("get_news", "news_headlines", "latest_news", "getHeadlines", "news_search", "headlines"),
        ("Latest news headlines on a topic.", "Search recent news."),
        (P("news_topic", "topic query q category", "string", "News topic"),
         P("limit", "limit count max_results", "integer", "How many headlines", required=False)),
        ("What's the latest news on {news_topic}?", "Give me {limit} headlines about {news_topic}.",
         "any news about {news_topic} today?", "news: {news_topic}"),
        _value("articles", _int(2, 20), "I found {x} recent stories about {news_topic}.",
               "There are {x} new articles on {news_topic}."),
        "fetch current news", "news", "a news site will have today's stories."),
    Archetype(
        "wiki", "wiki", ("info",),
        ("search_wikipedia", "wiki_lookup", "encyclopedia", "getSummary", "knowledge_search", "lookup"),
        ("Encyclopedia summary of a topic.", "Search Wikipedia."),
        (P("wiki", "query topic title search", "string", "What to look up"),),
        ("Look up {wiki} on Wikipedia.", "Give me a summary of {wiki}.", "Tell me about {wiki}.",
         "what does the encyclopedia say about {wiki}?"),
        lambda r, v: ({"summary": WIKI[v["wiki"]]}, WIKI[v["wiki"]]),
        "search an encyclopedia", "encyclopedia", "", offline=lambda r, v: WIKI[v["wiki"]]),
    # -- food --------------------------------------------------------------------------------------------
    Archetype(
        "recipes", "recipes", ("food",),
        ("search_recipes", "find_recipe", "recipe_search", "getRecipes", "recipes", "cookbook_lookup"),
        ("Find recipes by ingredient.", "Recipe search."),
        (P("ingredient", "ingredient ingredients query main_ingredient", "string", "Main ingredient"),
         P("small", "servings portions", "integer", "Number of servings", required=False),
         P("diet", "diet dietary_restriction", "string", "Diet", ("vegetarian", "vegan", "gluten-free"),
           required=False)),
        ("Find a recipe with {ingredient}.", "What can I cook with {ingredient} for {small} people?",
         "I need a {diet} recipe using {ingredient}.", "recipes with {ingredient}",
         "Something {diet} with {ingredient} for {small}, please."),
        _value("recipes_found", _int(2, 40), "I found {x} recipes with {ingredient}.",
               "There are {x} recipes using {ingredient}."),
        "search recipes", "recipe", "a recipe site will have plenty of ideas."),
    Archetype(
        "nutrition", "nutrition", ("food", "health"),
        ("get_nutrition", "calorie_lookup", "nutrition_facts", "getCalories", "food_info"),
        ("Calories and nutrients of a food.", "Nutrition lookup."),
        (P("food", "food item query food_name", "string", "Food"),),
        ("How many calories are in a {food}?", "Nutrition facts for {food}.", "calories in {food}?",
         "I just ate a {food}. How many calories was that?"),
        _value("calories", _int(40, 400), "A {food} has about {x} calories.", "{food}: roughly {x} kcal."),
        "look up nutrition data", "nutrition", "a nutrition database can tell you."),
    Archetype(
        "restaurant", "restaurant", ("food",),
        ("book_table", "reserve_table", "restaurant_reservation", "makeReservation", "book_restaurant"),
        ("Reserve a table at a restaurant.", "Make a dinner reservation."),
        (P("restaurant", "restaurant restaurant_name venue", "string", "Restaurant name"),
         P("small", "party_size guests people covers", "integer", "Number of people"),
         P("date", "date day", "string", "Date, YYYY-MM-DD"),
         P("time", "time at", "string", "Time, HH:MM")),
        ("Book a table at {restaurant} for {small} on {date} at {time}.",
         "Reserve {restaurant}, {small} people, {date} {time}.",
         "Can I get a table for {small} at {restaurant} at {time} on {date}?"),
        _done("Your table for {small} at {restaurant} is booked for {date} at {time}.", "Reserved: {restaurant}."),
        "make reservations", "reservation", "you can call the restaurant."),
    # -- shopping ----------------------------------------------------------------------------------------
    Archetype(
        "product_search", "shop_search", ("shop",),
        ("search_products", "product_search", "shop_search", "findProducts", "search_store", "amazon_search"),
        ("Search an online store.", "Find products to buy."),
        (P("product", "query product keywords search_term", "string", "What to look for"),
         P("max_price", "max_price price_limit budget", "number", "Highest price", required=False)),
        ("Find {product} under {max_price} dollars.", "Search the store for {product}.",
         "I'm looking for {product}, max {max_price}.", "shop for {product}", "any {product} below {max_price}?"),
        _value("results", _int(3, 120), "I found {x} listings for {product}.", "{x} results for {product}."),
        "search online stores", "shopping", "an online store will list options."),
    Archetype(
        "add_to_cart", "cart", ("shop",),
        ("add_to_cart", "addToCart", "cart_add", "add_item"),
        ("Add a product to the shopping cart.", "Put items in the cart."),
        (P("product", "product item product_name", "string", "Product"),
         P("small", "quantity qty count", "integer", "How many")),
        ("Add {small} {product} to my cart.", "Put {product} in my cart, quantity {small}.",
         "I'll take {small} of the {product}.", "cart: {product} x {small}"),
        _done("Added {small} x {product} to your cart.", "{product} is in your cart."),
        "manage a shopping cart", "shopping", "you can add it in the store's app."),
    Archetype(
        "track_package", "shipping", ("shop",),
        ("track_package", "track_shipment", "package_tracker", "trackOrder", "shipment_status", "where_is_my_package"),
        ("Tracking status of a parcel.", "Track a shipment by number."),
        (P("tracking", "tracking_number tracking_id code number", "string", "Tracking number"),
         P("carrier", "carrier courier", "string", "Carrier", ("UPS", "FedEx", "DHL", "USPS"), required=False)),
        ("Where is my package {tracking}?", "Track {tracking} with {carrier}.", "status of shipment {tracking}",
         "Has my {carrier} parcel {tracking} arrived yet?"),
        _value("status", _pick(["in transit", "out for delivery", "delivered", "at the local depot"]),
               "Package {tracking} is {x}.", "Your parcel is {x}."),
        "track packages", "package tracking", "the carrier's website can track it."),
    Archetype(
        "shipping_rate", "shipping_rate", ("shop",),
        ("shipping_cost", "estimate_shipping", "getShippingRate", "postage_calculator", "ship_quote"),
        ("Estimate the cost to ship a parcel.", "Postage calculator."),
        (P("parcel_kg", "weight_kg weight kg", "number", "Parcel weight in kg"),
         P("country", "destination country to_country", "string", "Destination country")),
        ("How much to ship a {parcel_kg} kg box to {country}?", "Shipping cost for {parcel_kg} kg to {country}?",
         "estimate postage: {parcel_kg} kg, destination {country}", "I'm sending {parcel_kg} kg to {country}. Price?"),
        _value("cost", _num(8, 180), "Shipping {parcel_kg} kg to {country} costs about {x}.",
               "The estimate is {x}."),
        "quote shipping costs", "shipping", "the post office site has a calculator."),
    # -- health ----------------------------------------------------------------------------------------
    Archetype(
        "log_workout", "fitness", ("health",),
        ("log_workout", "record_exercise", "fitness_log", "logActivity", "track_workout", "workout"),
        ("Record an exercise session.", "Log a workout in the fitness diary."),
        (P("activity", "activity exercise type sport", "string", "Kind of exercise"),
         P("minutes", "duration_minutes minutes duration", "integer", "Length in minutes")),
        ("Log a {minutes}-minute {activity} workout.", "I did {minutes} minutes of {activity}. Log it.",
         "Record {activity}, {minutes} min.", "add {activity} for {minutes} minutes to my fitness log"),
        _done("Logged {minutes} minutes of {activity}.", "Workout saved: {activity}, {minutes} minutes."),
        "log workouts", "fitness", "your fitness app can record it."),
    Archetype(
        "bmi", "bmi", ("health",),
        ("calculate_bmi", "bmi", "bmi_calculator", "getBMI", "body_mass_index"),
        ("Body mass index from weight and height.", "BMI calculator."),
        (P("body_kg", "weight_kg weight mass", "number", "Weight in kg"),
         P("height_cm", "height_cm height", "number", "Height in cm")),
        ("What's my BMI? I weigh {body_kg} kg and I'm {height_cm} cm tall.", "BMI for {body_kg} kg and {height_cm} cm?",
         "Calculate BMI: height {height_cm} cm, weight {body_kg} kg."),
        lambda r, v: ({"bmi": _bmi(v)}, f"Your BMI is {_bmi(v)}."),
        "calculate BMI", "BMI", "", offline=lambda r, v: f"That works out to a BMI of about {_bmi(v)}."),
    Archetype(
        "steps", "steps", ("health",),
        ("get_step_count", "steps_today", "step_counter", "getSteps", "activity_summary"),
        ("Steps walked on a given day.", "Pedometer data."),
        (P("date", "date day", "string", "Date, YYYY-MM-DD"),),
        ("How many steps did I walk on {date}?", "step count for {date}", "Did I hit my step goal on {date}?"),
        _value("steps", _int(800, 22000), "You walked {x} steps on {date}.", "{date}: {x} steps."),
        "read your step count", "fitness tracker", "your phone's health app has it."),
    # -- home --------------------------------------------------------------------------------------------
    Archetype(
        "lights", "lights", ("home",),
        ("set_lights", "control_lights", "lights", "setLightState", "smart_light", "toggle_light"),
        ("Turn smart lights on or off in a room.", "Control the lights."),
        (P("room", "room location area", "string", "Room"),
         P("state", "state power action", "string", "On or off", ("on", "off")),
         P("percent", "brightness level dim_level", "integer", "Brightness 0-100", required=False)),
        ("Turn {state} the {room} lights.", "Switch the lights in the {room} {state}.",
         ("Turn on the {room} lights at {percent}%.", {"state": "on"}),
         ("Set the {room} lights to {percent} percent brightness.", {"state": "on"}), "{room} lights {state}"),
        _done("The {room} lights are updated.", "Done, {room} lights adjusted."),
        "control smart lights", "smart home", "your smart home app can do it."),
    Archetype(
        "thermostat", "thermostat", ("home",),
        ("set_thermostat", "setTemperature", "thermostat", "climate_control", "adjust_heating"),
        ("Set the home thermostat.", "Change the target room temperature."),
        (P("temp", "temperature target_temp degrees setpoint", "number", "Target temperature"),
         P("units", "unit scale", "string", "Temperature unit", _C, required=False)),
        ("Set the thermostat to {temp} degrees.", "Make it {temp} degrees {units} in here.",
         "heat the house to {temp}", "Can you set the temperature to {temp}?"),
        _done("Thermostat set to {temp}.", "Okay, heating to {temp} degrees."),
        "change your thermostat", "smart home", "your thermostat app can set it."),
    Archetype(
        "door_lock", "locks", ("home",),
        ("lock_door", "door_lock", "setLockState", "smart_lock"),
        ("Lock or unlock a smart door lock.", "Control the door locks."),
        (P("door", "door lock_name which", "string", "Which door"),
         P("action", "action state command", "string", "What to do", ("lock", "unlock"))),
        ("{action} the {door}.", "Please {action} the {door}.", "Can you {action} the {door}?",
         "I'm away. {action} the {door}, please."),
        _done("The {door} is now {action}ed.", "Done: {door} {action}ed."),
        "control door locks", "smart home", "your lock's app can do it."),
    # -- fun ---------------------------------------------------------------------------------------------
    Archetype(
        "joke", "jokes", ("fun",),
        ("get_joke", "random_joke", "joke_api", "tellJoke", "jokes", "fetch_joke"),
        ("Returns a random joke.", "Joke generator."),
        (P("category", "category type topic", "string", "Kind of joke", ("programming", "animals", "puns", "dad"),
           required=False),),
        ("Tell me a joke.", "Tell me a {category} joke.", "I need a laugh, give me a {category} joke.", "joke please",
         "Got any good {category} jokes?"),
        _value("joke", _pick(JOKES), "{x}"),
        "fetch jokes", "joke", "", offline=lambda r, v: r.choice(JOKES)),
    Archetype(
        "quote", "quotes", ("fun",),
        ("get_quote", "random_quote", "quote_of_the_day", "getQuote", "inspire"),
        ("Returns an inspiring quote.", "Quote of the day."),
        (P("quote_topic", "topic category tag", "string", "Theme", required=False),),
        ("Give me an inspiring quote.", "quote about {quote_topic}", "I need a quote on {quote_topic} for my speech.",
         "Share a quote about {quote_topic}, please."),
        _value("quote", _pick(QUOTES), "{x}"),
        "fetch quotes", "quotes", "", offline=lambda r, v: r.choice(QUOTES)),
]
BY_KEY = {a.key: a for a in ARCHETYPES}

# ---------------------------------------------------------------------------------------------------
# Plain conversation pools
# ---------------------------------------------------------------------------------------------------

# (request, reply, domain the request belongs to: a tool of that domain must not be listed beside it)
CHAT: list[tuple[str, str, str | None]] = [
    ("Hello!", "Hello! How can I help you today?", None), ("Hi there", "Hi! What can I do for you?", None),
    ("Good morning", "Good morning! How can I help?", None), ("hey", "Hey! What do you need?", None),
    ("How are you?", "I'm doing well, thanks for asking. How can I help?", None),
    ("Thanks!", "You're welcome!", None), ("Thank you so much, that helped.", "Glad I could help!", None),
    ("Who are you?", "I'm a small assistant. I can chat and use tools when they're available.", None),
    ("Goodbye", "Goodbye! Have a nice day.", None), ("ok cool", "Great. Anything else?", None),
    ("What's the capital of France?", "The capital of France is Paris.", "wiki"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "wiki"),
    ("Which planet is the largest?", "Jupiter is the largest planet in the solar system.", "wiki"),
    ("How many days are in a leap year?", "A leap year has 366 days.", "wiki"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", "wiki"),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green.", "wiki"),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most.", "wiki"),
    ("How many continents are there?", "There are seven continents.", "wiki"),
    ("What is water made of?", "Water is two hydrogen atoms and one oxygen atom: H2O.", "wiki"),
    ("Tell me a joke.", JOKES[0], "jokes"), ("Make me laugh", JOKES[6], "jokes"),
    ("Give me a tip for sleeping better.", "Keep a regular bedtime and put screens away an hour before sleep.", None),
    ("Any advice for a job interview?", "Research the company, prepare a few stories and ask good questions.", None),
    ("Write a haiku about rain.", "Soft rain on the roof / the street hums a quiet song / puddles hold the sky", None),
    ("Can you help me?", "Of course. What do you need?", None),
    ("What's a good name for a cat?", "How about Miso, Luna or Pepper?", None),
    ("I'm bored.", "You could take a short walk, call a friend or start a new book.", None),
    ("Suggest a quick breakfast.", "Yogurt with fruit and oats is quick and filling.", "recipes"),
    ("Is a tomato a fruit?", "Botanically yes, a tomato is a fruit, though it's cooked like a vegetable.", "wiki"),
]
NO_TOOL_OPENERS = ("I can't {ability} without a {noun} tool.", "Sorry, I don't have access to {noun} data here.",
                   "I'm not able to {ability} right now, since no tools are available.",
                   "I can't {ability} from here.")
UNLISTED_OPENERS = ("I don't have a tool for that, but {tip}", "None of my tools can {ability}, sorry.",
                    "I don't have a {noun} tool, so I can't {ability}.",
                    "Sorry, the tools I have can't {ability}.")
CONTEXT = ("I'm planning a trip.", "Just curious.", "It's for work.", "I'm in a bit of a hurry.",
           "Quick question.", "My phone is almost dead.", "Sorry to bother you.")
OPENERS = ("Hey, ", "Hi! ", "Okay, ", "Please, ", "Quick one: ", "Hello, ")
CLOSERS = (" Thanks!", " Thank you.", " Cheers.", " Please.", " thx")
SYSTEM = "You are a helpful assistant."
# Fine-tuning rows are 512 tokens and the bundled tokenizer spends about 100 tokens on a tool (3.2
# characters a token): a tool list is cut to about 360 tokens, leaving room for the conversation.
TOOLS_CHAR_BUDGET = 1150

# ---------------------------------------------------------------------------------------------------
# Building tools and requests
# ---------------------------------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def tool_schema(rng: random.Random, arch: Archetype) -> tuple[dict[str, Any], dict[str, str]]:
    """One concrete tool of `arch` in OpenAI's wrapped shape, and its slot -> parameter-name map.

    The name, the description and every parameter's name are drawn; a camelCase tool name makes
    camelCase parameter names most of the time, as such APIs do. Some tools describe only some
    parameters (the name and type must then do)."""
    name = rng.choice(arch.names)
    camel = any(c.isupper() for c in name) and rng.random() < 0.7
    terse = rng.random() < 0.4  # many real schemas describe only some parameters, or none
    props, required, names = {}, [], {}
    for p in arch.params:
        pname = rng.choice(p.names)
        pname = _camel(pname) if camel else pname
        names[p.slot] = pname
        prop: dict[str, Any] = {"type": p.type}
        if terse is False or rng.random() < 0.5:
            prop["description"] = p.desc
        if p.enum:
            prop["enum"] = list(p.enum)
        props[pname] = prop
        if p.required:
            required.append(pname)
    schema = {"type": "function", "function": {
        "name": name, "description": rng.choice(arch.descriptions),
        "parameters": {"type": "object", "properties": props, "required": required}}}
    return schema, names


def _slot_values(rng: random.Random, arch: Archetype) -> dict[str, Any]:
    """A value for every slot of `arch` (two slots of one kind, such as city and city2, differ)."""
    v = arch.make(rng) if arch.make else {}
    for p in arch.params:
        if p.slot in v or p.type == "boolean":  # booleans come from the request template's constants
            continue
        if p.enum:
            v[p.slot] = rng.choice(p.enum)
            continue
        gen = VALUES[p.slot.rstrip("2")]
        value = gen(rng)
        while any(value == v.get(s) for s in (p.slot.rstrip("2"), p.slot.rstrip("2") + "2")):
            value = gen(rng)
        v[p.slot] = value
    return v


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _dress(rng: random.Random, template: str) -> str:
    """The template in one of many surface forms: an opener, a context sentence, a closer, lower case.

    Only the template's own words change: the `{slot}` fields are filled afterwards, so values keep
    their exact spelling."""
    t = template
    if rng.random() < 0.15:
        t = t.lower()
    if rng.random() < 0.25:
        opener = rng.choice(OPENERS)
        t = opener + (t[0].lower() + t[1:] if t[:1].isupper() and not t.startswith(("I ", "I'")) else t)
    if rng.random() < 0.15:
        t = rng.choice(CONTEXT) + " " + t if rng.random() < 0.5 else t + " " + rng.choice(CONTEXT)
    elif rng.random() < 0.15:
        t += rng.choice(CLOSERS)
    return t[:1].upper() + t[1:] if t[:1] != "{" and rng.random() < 0.9 else t


def request(rng: random.Random, arch: Archetype) -> tuple[str, dict[str, Any]]:
    """A user request for `arch` and the slot values it mentions (all required slots, some optional)."""
    v = _slot_values(rng, arch)
    required = {p.slot for p in arch.params if p.required}
    asks = [(a, {}) if isinstance(a, str) else a for a in arch.asks]
    template, fixed = rng.choice([(t, f) for t, f in asks if required <= set(_fields(t)) | set(f)])
    v.update(fixed)
    text = _dress(rng, template).format(**v)
    used = set(_fields(template)) | set(fixed)
    return text, {k: x for k, x in v.items() if k in used}


def _distractors(rng: random.Random, exclude_domains: set[str], groups: tuple[str, ...], k: int) -> list[Archetype]:
    """`k` archetypes of distinct domains outside `exclude_domains` (tools of one domain may answer each
    other's requests), each from a related group (sharing one of `groups`) half the time, so that the
    right tool must be told from its neighbours."""
    out: list[Archetype] = []
    for _ in range(k):
        taken = exclude_domains | {a.domain for a in out}
        pool = [a for a in ARCHETYPES if a.domain not in taken]
        related = [a for a in pool if set(a.groups) & set(groups)]
        out.append(rng.choice(related if related and rng.random() < 0.5 else pool))
    return out


def _tool_count(rng: random.Random) -> int:
    return rng.choices([1, 2, 3, 4, 5], weights=[15, 27, 30, 18, 10])[0]


def _listed(rng: random.Random, archs: list[Archetype]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Schemas of `archs` with distinct tool names (a clash is drawn again), the last ones left out
    while the list is over `TOOLS_CHAR_BUDGET` (the first is always kept)."""
    schemas, maps, seen = [], [], set()
    for a in archs:
        schema, names = tool_schema(rng, a)
        while schema["function"]["name"] in seen:
            schema, names = tool_schema(rng, a)
        seen.add(schema["function"]["name"])
        schemas.append(schema)
        maps.append(names)
    while len(schemas) > 1 and len(json.dumps(schemas)) > TOOLS_CHAR_BUDGET:
        schemas.pop()
        maps.pop()
    return schemas, maps


def _system(rng: random.Random) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM}] if rng.random() < 0.15 else []


def tool_call_conversation(rng: random.Random) -> dict[str, Any]:
    """A request, the call of the one listed tool that answers it, its result and a short answer."""
    arch = rng.choice(ARCHETYPES)
    others = _distractors(rng, {arch.domain}, arch.groups, _tool_count(rng) - 1)
    schemas, maps = _listed(rng, [arch, *others])
    order = list(range(len(schemas)))
    rng.shuffle(order)  # the right tool (first) goes to a random position
    schemas, maps = [schemas[j] for j in order], [maps[j] for j in order]
    i = order.index(0)
    text, v = request(rng, arch)
    args = {maps[i][p.slot]: v[p.slot] for p in arch.params if p.slot in v}
    name = schemas[i]["function"]["name"]
    result, answer = arch.result(rng, v)
    call = {"id": f"call_{rng.randrange(16**8):08x}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}
    messages = [*_system(rng), {"role": "user", "content": text},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)},
                {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": schemas, "expected": {"name": name, "arguments": args}}


def _unavailable(rng: random.Random, arch: Archetype, v: dict[str, Any], openers: tuple[str, ...]) -> str:
    """The plain reply to a request for `arch` when its tool is not at hand."""
    if arch.offline and openers is NO_TOOL_OPENERS:
        return arch.offline(rng, v)
    if arch.offline and rng.random() < 0.5:
        return arch.offline(rng, v)
    opener = rng.choice([o for o in openers if arch.tip or "{tip}" not in o])
    reply = opener.format(ability=arch.ability, noun=arch.noun, tip=arch.tip)
    if arch.tip and "{tip}" not in opener and rng.random() < 0.6:
        reply += " " + arch.tip[0].upper() + arch.tip[1:]
    return reply


def _chat_reply(rng: random.Random, q: str, a: str, schemas: list[dict[str, Any]]) -> str:
    if q in ("What can you do?", "Who are you?") and schemas:
        names = ", ".join(s["function"]["name"] for s in schemas)
        return f"I can chat, answer questions and use the tools I have here: {names}."
    return a


def listed_no_call_conversation(rng: random.Random) -> dict[str, Any]:
    """Tools listed, but the request is ordinary or needs a tool that is not listed: a plain answer."""
    if rng.random() < 0.5:
        q, a, domain = rng.choice([*CHAT, ("What can you do?", "", None)])
        archs = _distractors(rng, {domain} if domain else set(), (), _tool_count(rng))
        schemas, _ = _listed(rng, archs)
        text, reply = _dress(rng, q) if rng.random() < 0.3 else q, _chat_reply(rng, q, a, schemas)
    else:
        arch = rng.choice(ARCHETYPES)
        archs = _distractors(rng, {arch.domain}, arch.groups, _tool_count(rng))
        schemas, _ = _listed(rng, archs)
        text, v = request(rng, arch)
        reply = _unavailable(rng, arch, v, UNLISTED_OPENERS)
    messages = [*_system(rng), {"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    return {"messages": messages, "tools": schemas}


def no_tools_conversation(rng: random.Random) -> dict[str, Any]:
    """No tools at all: ordinary and tool-like requests alike get a plain answer, never a call."""
    if rng.random() < 0.6:
        arch = rng.choice(ARCHETYPES)
        text, v = request(rng, arch)
        reply = _unavailable(rng, arch, v, NO_TOOL_OPENERS)
    else:
        q, a, _ = rng.choice([*CHAT, ("What can you do?", "I can chat and answer questions. With tools listed, "
                                                          "I can also call them for you.", None)])
        text, reply = (_dress(rng, q) if rng.random() < 0.3 else q), a
    return {"messages": [*_system(rng), {"role": "user", "content": text}, {"role": "assistant", "content": reply}]}


def wide_conversations(n: int, seed: int, calls: float = 0.6) -> list[dict[str, Any]]:
    """`n` conversations (`calls` of them tool calls, the rest half tools listed but not called, half no
    tools); deterministic in `seed`. See the module docstring for what they hold and why."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < calls:
            out.append(tool_call_conversation(rng))
        elif r < calls + (1 - calls) / 2:
            out.append(listed_no_call_conversation(rng))
        else:
            out.append(no_tools_conversation(rng))
    return out
