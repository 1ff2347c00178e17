"""Tool calling measured on requests nobody here generated: `python -m lfm2.train.tool_eval --model M`.

The recipe's own held-out prompts (`bundle.heldout_prompts`) come from the same templates as its
training conversations, so they measure how well a model learned `lfm2.train.synth`, not whether
it calls tools it has never seen as people ask for them. This set was written by hand apart from
the generator (`benchmarks/data/tool_eval.json`: 56 tools from two dozen domains, 164 requests,
varied names, parameter names and phrasings; its description says how) and is a test set: it never
trains or tunes anything, and no recipe choice is made by its score.

Each item lists 2-5 tools and expects one call. The first reply (greedy) scores:
- right tool: its first call names the expected tool;
- right tool and arguments: also every expected argument present and equal under the item's match
  rule ("exact": JSON equality with 5 == 5.0, "casefold": case and surrounding spaces ignored,
  "contains": the expected text inside the produced one), and no argument the tool does not have.
A prompt longer than the model's context counts as a miss.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm2.errors import GenerationError, LFM2Error

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "tool_eval.json"


@dataclass
class Item:
    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    expected: dict[str, Any]
    match: dict[str, str]


def load_items(path: Path | None = None) -> list[Item]:
    """The evaluation items (default: the repository's set), each with its tools' schemas in the listed order."""
    path = DEFAULT_PATH if path is None else path
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LFM2Error(f"{path}: cannot read the tool-call evaluation set ({e.strerror}); it ships in the "
                        "repository's benchmarks/data/, not in the installed package") from None
    tools = data["tools"]
    return [Item(it["id"], it["messages"], [tools[name] for name in it["tools"]], it["expected"], it.get("match", {}))
            for it in data["items"]]


def value_matches(got: Any, want: Any, mode: str = "exact") -> bool:
    """Whether a produced argument value counts as the expected one (see the module docstring)."""
    if mode == "exact":
        if isinstance(want, bool) or isinstance(got, bool):
            return got is want
        if isinstance(want, (int, float)) and isinstance(got, (int, float)):
            return math.isclose(got, want, rel_tol=0, abs_tol=1e-9)
        return got == want
    if not isinstance(got, str) or not isinstance(want, str):
        return value_matches(got, want, "exact")
    if mode == "casefold":
        return got.strip().casefold() == want.strip().casefold()
    if mode == "contains":
        return want.casefold() in got.casefold()
    raise ValueError(f"unknown match mode {mode!r}")


def score_call(calls: list[dict[str, Any]], item: Item) -> tuple[bool, bool]:
    """(right tool, right tool and arguments) for a reply's OpenAI-style `tool_calls`."""
    if not calls or calls[0]["function"]["name"] != item.expected["name"]:
        return False, False
    try:
        args = json.loads(calls[0]["function"]["arguments"])
    except (TypeError, json.JSONDecodeError):
        return True, False
    schema = next(t for t in item.tools if t["function"]["name"] == item.expected["name"])
    known = set(schema["function"]["parameters"].get("properties", {}))
    if not isinstance(args, dict) or set(args) - known:
        return True, False
    right = all(k in args and value_matches(args[k], v, item.match.get(k, "exact"))
                for k, v in item.expected["arguments"].items())
    return True, right


def first_calls(llm: Any, requests: list[tuple[list[dict], list[dict]]], strict: bool, whole_names: bool = True,
                desc: str = "tool-call eval", progress: bool = True) -> list[list[dict[str, Any]]]:
    """The `tool_calls` of the greedy first reply to each (messages, tools); `strict` constrains calls to
    the schemas (`lfm2.constrain`), choosing a tool by its whole name unless `whole_names` is False.
    A reply that does not parse, or a prompt longer than the model's context, gives no calls."""
    from tqdm import tqdm

    out = []
    llm.whole_tool_names, was = whole_names, llm.whole_tool_names
    try:
        for messages, tools in tqdm(requests, desc=desc, disable=not progress):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an unparsable call is just a miss here
                try:
                    reply = llm.chat(messages, tools=tools, temperature=0, max_new_tokens=96, strict_tools=strict)
                except GenerationError as e:
                    if "context" not in str(e):
                        raise
                    reply = {}
            out.append(reply.get("tool_calls") or [])
    finally:
        llm.whole_tool_names = was
    return out


def run(llm: Any, items: list[Item], strict: bool, whole_names: bool = True,
        progress: bool = True) -> list[tuple[bool, bool]]:
    """Each item's (right tool, right arguments), greedy (see `first_calls`)."""
    desc = f"independent tool eval ({'strict' if strict else 'unconstrained'})"
    calls = first_calls(llm, [(item.messages, item.tools) for item in items], strict, whole_names, desc, progress)
    return [score_call(c, item) for c, item in zip(calls, items, strict=True)]


def evaluate(llm: Any, items: list[Item] | None = None, progress: bool = True) -> dict[str, Any]:
    """The figures the README and the model card quote, unconstrained and strict."""
    items = load_items() if items is None else items
    tools = {t["function"]["name"] for item in items for t in item.tools}
    out: dict[str, Any] = {"independent_tool_prompts": len(items), "independent_tools": len(tools)}
    for key, strict in (("independent", False), ("independent_strict", True)):
        results = run(llm, items, strict, progress=progress)
        out[f"{key}_right_tool"] = sum(t for t, _ in results) / len(items)
        out[f"{key}_right_tool_and_arguments"] = sum(a for _, a in results) / len(items)
    return out


def main(argv: list[str] | None = None) -> None:
    import lfm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", "-m", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--data", default=str(DEFAULT_PATH), help="the evaluation set (JSON)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    llm = lfm2.load(args.model or lfm2.default_model_path())
    figures = evaluate(llm, load_items(Path(args.data)))
    n = figures["independent_tool_prompts"]
    print(f"{n} hand-written requests ({args.data}), greedy:")
    print("| calls | right tool | right tool and arguments |\n|---|---|---|")
    for label, key in (("unconstrained", "independent"), ("strict", "independent_strict")):
        print(f"| {label} | {figures[f'{key}_right_tool']:.1%} | {figures[f'{key}_right_tool_and_arguments']:.1%} |")
    if args.json:
        from lfm2.files import atomic_write

        atomic_write(Path(args.json), json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except LFM2Error as e:
        sys.exit(f"lfm2: error: {e}")
