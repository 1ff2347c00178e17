"""The `lfm2` command: a thin layer that parses arguments and calls the Python API.

    lfm2 generate --model M "prompt"      stream a completion to stdout
    lfm2 chat --model M                   interactive multi-turn chat (/reset, /system, /exit)
    lfm2 chat --tools tools.json          ... offering tools: you type each call's result
    lfm2 chat --max-reasoning-tokens 256  ... a reasoning model's thought (shown dimmed) capped
    lfm2 train --config run.json          train or fine-tune (resumable), see lfm2/train/trainer.py
    lfm2 convert SRC --to gguf|hf -o OUT  convert between Hugging Face checkpoints and GGUF files
    lfm2 serve --model M --port 8000      OpenAI-compatible HTTP server, concurrent requests batched
    lfm2 finetune sft|dpo|distill ...     LoRA or full fine-tuning (see lfm2/train/finetune.py)
    lfm2 merge ...                        fold an adapter into its model, or average checkpoints
    lfm2 quantize SRC -o OUT --type int8|int4   quantized checkpoint (lfm2.quant), loads directly
    lfm2 bench --preset LFM2-350M         lfm2 vs transformers vs llama.cpp at matched precision
    lfm2 bench --gguf FILE                lfm2.load(FILE) vs llama.cpp on the same GGUF file

Every failure the user can fix (a bad flag, an unreadable model path, a bad sampling value)
prints one line starting with "lfm2: error:" and exits with status 2; no stack traces.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lfm2 import __version__
from lfm2.errors import LFM2Error


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:  # every (sub)command's help shows its defaults
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one clear line instead of usage + message
        sys.stderr.write(f"lfm2: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """What model to run and how to load it: shared by `generate`, `chat` and `serve` (every help line
    says its default, as `lfm2 serve --help` promises)."""
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint directory, .gguf file or Hugging Face hub id (default: the bundled tiny model)")
    p.add_argument("--mmproj", default=None, metavar="FILE",
                   help="with a .gguf model: the mmproj .gguf of an LFM2-VL model (its vision part), so that the "
                        "model reads images (default: none, text only)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (default: %(default)s)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) to apply (default: none)")
    p.add_argument("--quantize", choices=["int8", "int4", "none"], default=None,
                   help="quantize the weights after loading (lfm2.quant's kernels). Without it a checkpoint "
                        "written by `lfm2 quantize` loads quantized, a Q8_0 / Q4_0 .gguf file keeps its own "
                        "format, and a K-quant one (Q4_K_M ...) runs its Q4_K/Q5_K/Q6_K blocks as they are "
                        "(lfm2's K-quant kernels; int8 where they did not build); none: dequantize such a file "
                        "(default: the model's own format)")


def add_image_args(p: argparse.ArgumentParser, files: str | None = None) -> None:
    """Vision models' options: the image-token budget and tiling (the speed/quality dial), and with
    `files` (what an image goes with) a repeatable `--image FILE`. `lfm2 serve` shares the budget."""
    g = p.add_argument_group("images (vision models such as LFM2-VL; defaults: the checkpoint's processor settings)")
    if files is not None:
        g.add_argument("--image", action="append", default=None, metavar="FILE",
                       help=f"an image for {files} (repeatable)")
    g.add_argument("--min-image-tokens", type=int, default=None, metavar="N",
                   help="fewest tokens an image (or its thumbnail) is resized to (default: the checkpoint's, 64)")
    g.add_argument("--max-image-tokens", type=int, default=None, metavar="N",
                   help="most tokens an image is resized to: fewer encode and prefill faster, more keep detail "
                        "(default: the checkpoint's, 256)")
    g.add_argument("--no-image-splitting", action="store_true",
                   help="never cut a large image into 512-pixel tiles plus a thumbnail: faster, less detail "
                        "(default: the checkpoint's setting, tiles on)")


def apply_image_args(llm: Any, args: argparse.Namespace) -> None:
    """Set the image budget options on `llm`'s preprocessing; refuse them (and `--image`) for a text model."""
    given = [f"--{n.replace('_', '-')}" for n in ("image", "min_image_tokens", "max_image_tokens", "no_image_splitting")
             if getattr(args, n, None)]
    if llm.vision is None:
        if given:
            raise LFM2Error(f"{llm.path} reads text only: {', '.join(given)} need a vision model "
                            "(an LFM2-VL checkpoint, or a .gguf model with --mmproj)")
        return
    llm.image_processor = llm.image_processor.with_budget(args.min_image_tokens, args.max_image_tokens,
                                                          False if args.no_image_splitting else None)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json, else the model card)")
    g.add_argument("--temperature", type=float, help="0 means greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-new-tokens", type=int, default=512, help="the most tokens a reply may have")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--verbose", "-v", action="store_true", help="print timing (tokens/s) to stderr")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step before the first token (about a minute the first time, "
                        "seconds once cached on disk). Default: the fused decode step (lfm2.step, nothing to compile) "
                        "where it fits the model, else compiled on the CPU for models of 50M+ weights; --compile: "
                        "for any model; --no-compile: never, and no fused step (eager Python)")


def _add_tool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="JSON file: a list of tools, in OpenAI's shape ({'type': 'function', 'function': {...}}) "
                        "or bare ({'name', 'description', 'parameters'}), listed to the model as written")
    p.add_argument("--strict-tools", action="store_true",
                   help="keep every tool call valid against the listed schemas (lfm2.constrain)")


def _add_format_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (one of; lfm2.structured)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--json-schema", metavar="FILE", help="JSON Schema file: every reply is JSON valid against it")
    x.add_argument("--json", action="store_true", help="every reply is a JSON object")
    x.add_argument("--regex", metavar="PATTERN", help="every reply matches this regular expression whole")
    x.add_argument("--choice", action="append", metavar="TEXT", help="every reply is one of these (repeatable)")


def _output_format(args: argparse.Namespace) -> dict[str, Any]:
    """The structured-output keyword for `generate`/`chat`, from the flags (the schema file read and
    checked here, before the model loads)."""
    from lfm2 import structured

    if args.json_schema is not None:
        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except OSError as e:
            raise LFM2Error(f"--json-schema {args.json_schema}: cannot read it ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LFM2Error(f"--json-schema {args.json_schema}: not a JSON file ({e})") from None
        return {"json_schema": structured.json_schema(schema, param=f"--json-schema {args.json_schema}")}
    if args.json:
        return {"response_format": {"type": "json_object"}}
    if args.regex is not None:
        return {"regex": structured.regex(args.regex, param="--regex")}
    if args.choice:
        return {"choice": structured.choice(args.choice, param="--choice")}
    return {}
def _add_reasoning_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reasoning models (a <think> block before the answer)")
    g.add_argument("--max-reasoning-tokens", type=int, default=None, metavar="N",
                   help="close the thinking block after N tokens so that the model answers")
    g.add_argument("--hide-reasoning", action="store_true",
                   help="do not print the thought (it is shown dimmed on a terminal, after 'Thinking:' elsewhere)")


class _ReplyPrinter:
    """Prints a streamed chat reply (`LLM.chat_stream`'s deltas): the thought first, set apart from
    the answer (dimmed on a terminal; elsewhere, where escape codes would be noise, on a line that
    starts with "Thinking:"), or hidden; then the answer and each tool call on a line of its own."""

    DIM, RESET, ERASE = "\x1b[2m", "\x1b[0m", "\r\x1b[K"

    def __init__(self, out: Any, hide_reasoning: bool = False) -> None:
        self.out, self.hide = out, hide_reasoning
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.thinking = False  # the thought (or, hidden, its placeholder) is on screen, not yet closed
        self.open_line = False  # answer text printed since the last newline
        self.printed = False  # anything printed for this reply

    def delta(self, delta: dict[str, Any]) -> None:
        if delta.get("reasoning_content"):
            if not self.thinking:
                if self.hide:
                    self._write(self.DIM + "[thinking...]" + self.RESET if self.tty else "")
                else:
                    self._write(self.DIM if self.tty else "Thinking: ")
                self.thinking = True
            if not self.hide:
                self._write(delta["reasoning_content"])
            return
        self.close_thought()
        if delta.get("content"):
            self._write(delta["content"])
            self.open_line = True
        for call in delta.get("tool_calls") or ():
            if self.open_line:
                self._write("\n")
            self._write(_format_call(call) + "\n")
            self.open_line = False

    def close_thought(self) -> None:
        """End the thought's display (before the answer, or when the reply ends inside it)."""
        if not self.thinking:
            return
        self.thinking = False
        if self.hide:
            self._write(self.ERASE if self.tty else "")
        else:
            self._write((self.RESET if self.tty else "") + "\n")

    def end(self, interrupted: bool = False) -> None:
        """The reply is over: close what is open, ending on a new line."""
        was_hidden = self.thinking and self.hide
        self.close_thought()
        if interrupted:
            self._write(" [interrupted]\n")
        elif self.open_line or not self.printed or was_hidden:
            self._write("\n")
        self.open_line = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.printed = True


def _load_tools(path: str | None, strict: bool = False) -> list[dict[str, Any]] | None:
    """The `--tools` file: a JSON list of tool schemas (one object is taken as a list of one)."""
    if path is None:
        if strict:
            raise LFM2Error("--strict-tools needs --tools FILE (the schemas the calls are kept to)")
        return None
    from lfm2.tools import tool_schema

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LFM2Error(f"--tools {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise LFM2Error(f"--tools {path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    tools = [raw] if isinstance(raw, dict) else raw
    if not isinstance(tools, list) or not tools:
        raise LFM2Error(f"--tools {path}: expected a JSON list of tool schemas, got {type(raw).__name__}")
    for i, tool in enumerate(tools):
        try:
            tool_schema(tool)  # checked here; the chat template lists each tool as the file has it
        except LFM2Error as e:
            raise LFM2Error(f"--tools {path}: tool {i}: {e}") from None
    return tools


def _format_call(call: dict[str, Any]) -> str:
    fn = call["function"]
    return f"[tool call] {fn['name']}({fn['arguments']})"


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "max_new_tokens", "stop", "max_reasoning_tokens")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


# Each subcommand: its one-line help, and the function that adds its arguments. Only the command
# being run gets its arguments (and imports its module): `lfm2 --help` and `lfm2 generate --help`
# then never import torch, which costs seconds.
_COMMANDS = {
    "generate": "complete a prompt, streaming to stdout",
    "chat": "interactive multi-turn chat",
    "train": "train or fine-tune from a JSON config (resumes if interrupted)",
    "convert": "convert a checkpoint to GGUF (llama.cpp) or a GGUF file back to a checkpoint",
    "finetune": "fine-tune a model: sft, dpo or distill (LoRA by default)",
    "merge": "fold a LoRA adapter into its model, or average checkpoints",
    "bench": "lfm2 vs transformers vs llama.cpp, prefill/decode/TTFT/memory, side by side",
    "quantize": "write an int8 / int4 copy of a float checkpoint (loads directly)",
    "serve": "OpenAI-compatible HTTP server with continuous batching",
}


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help=_COMMANDS["generate"])
    add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("prompt", nargs="?", help="the prompt (read from stdin when absent)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text (benchmarks)")
    _add_tool_args(g)
    _add_format_args(g)
    _add_reasoning_args(g)
    add_image_args(g, "the prompt, which then goes through the chat template (as with --chat)")


def _add_chat(sub) -> None:
    c = sub.add_parser("chat", help=_COMMANDS["chat"])
    add_model_args(c)
    _add_sampling_args(c)
    _add_tool_args(c)
    _add_format_args(c)
    _add_reasoning_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    add_image_args(c, "the first message")


def _add_train(sub) -> None:
    t = sub.add_parser("train", help=_COMMANDS["train"])
    t.add_argument("--config", required=True, help="JSON file of lfm2.train.trainer.TrainConfig fields")
    t.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")


def _add_convert(sub) -> None:
    from lfm2.convert import add_convert_parser

    add_convert_parser(sub)


def _add_finetune(sub) -> None:
    from lfm2.train.finetune import add_finetune_parser

    add_finetune_parser(sub)


def _add_merge(sub) -> None:
    from lfm2.merge import add_merge_parser

    add_merge_parser(sub)


def _add_bench(sub) -> None:
    from lfm2.bench import add_arguments

    add_arguments(sub.add_parser("bench", help=_COMMANDS["bench"]))


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help=_COMMANDS["quantize"])
    q.add_argument("src", help="float checkpoint directory or hub id")
    q.add_argument("-o", "--out", required=True, help="output directory")
    q.add_argument("--type", required=True, choices=["int8", "int4"])
    q.add_argument("--group-size", default="32",
                   help="32, 64 or 128 values per scale, or 'channel' (int8 only: one scale per output row)")
    q.add_argument("--embedding-type", choices=["int8", "int4"], default=None,
                   help="format of the embedding / output head (default: int8, also for --type int4)")


def _add_serve(sub) -> None:
    from lfm2.server import add_serve_parser

    add_serve_parser(sub)


_ADDERS = {"generate": _add_generate, "chat": _add_chat, "train": _add_train, "convert": _add_convert,
           "finetune": _add_finetune, "merge": _add_merge, "bench": _add_bench, "quantize": _add_quantize,
           "serve": _add_serve}


class _Help(argparse.HelpFormatter):
    """Shows each option's default where it has a real one (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in help or not action.option_strings:
            return help
        return f"{help} (default: %(default)s)" if help else "(default: %(default)s)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `lfm2` parser. With `command` (a name, or "" for none), only that subcommand gets its
    arguments and the others are listed by name and help alone, so that parsing never imports
    what another command needs; None builds them all."""
    parser = _Parser(prog="lfm2", description="Run, serve and fine-tune Liquid AI's LFM2 models.")
    parser.add_argument("--version", action="version", version=f"lfm2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for name, help in _COMMANDS.items():
        if command is None or name == command:
            _ADDERS[name](sub)
        else:
            sub.add_parser(name, help=help)
    return parser


def _print_stats(llm) -> None:
    for s in llm.last_stats:
        print(
            f"[{s.prompt_tokens} prompt tokens, {s.completion_tokens} generated; "
            f"first token {s.time_to_first_token_s * 1000:.0f} ms, prefill {s.prefill_tokens_per_s:.1f} tok/s, "
            f"decode {s.decode_tokens_per_s:.1f} tok/s; finish: {s.finish_reason}]",
            file=sys.stderr,
        )


def cmd_generate(args: argparse.Namespace) -> None:
    import lfm2

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    tools = _load_tools(args.tools, args.strict_tools)
    args.chat = args.chat or bool(args.image)  # images go through the chat template
    if tools and not args.chat:
        raise LFM2Error("--tools needs --chat (tools are offered through the chat template)")
    output = _output_format(args)
    if output and args.ignore_eos:
        raise LFM2Error("--ignore-eos cannot go with a structured-output flag: the reply ends where its format does")
    if args.max_reasoning_tokens is not None and not args.chat:
        raise LFM2Error("--max-reasoning-tokens needs --chat (the thinking block is part of a chat reply)")
    llm = lfm2.load(args.model, dtype=args.dtype, device=args.device, adapter=args.adapter,
                    quantize=args.quantize, compile=args.compile, mmproj=args.mmproj)
    from lfm2.compile import warm

    warm(llm.model, 1)  # here, so that --verbose's prefill and first-token figures leave the compiler out
    apply_image_args(llm, args)
    sampling = {**_sampling(args), **output}
    if args.chat:
        content: Any = prompt
        if args.image:  # the images first, then the text, as LFM2-VL's model card writes its prompts
            content = [*({"type": "image_url", "image_url": {"url": _checked_image(path)}} for path in args.image),
                       {"type": "text", "text": prompt}]
        printer = _ReplyPrinter(sys.stdout, args.hide_reasoning)
        interrupted = True
        try:
            for delta in llm.chat_stream([{"role": "user", "content": content}], tools=tools,
                                         strict_tools=args.strict_tools or None, **sampling):
                printer.delta(delta)
            interrupted = False
        finally:  # also on Ctrl-C: the colours are reset and the shell's prompt starts on a line of its own
            printer.end()
            if interrupted:
                sys.stdout.write("\n")
    else:
        try:
            for piece in llm.stream(prompt, ignore_eos=args.ignore_eos, **sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:  # also on Ctrl-C: the shell's prompt starts on a line of its own
            sys.stdout.write("\n")
            sys.stdout.flush()
    if args.verbose:
        _print_stats(llm)


def cmd_chat(args: argparse.Namespace) -> None:
    import lfm2
    from lfm2.tools import tool_schema

    tools = _load_tools(args.tools, args.strict_tools)
    output = _output_format(args)
    llm = lfm2.load(args.model, dtype=args.dtype, device=args.device, adapter=args.adapter,
                    quantize=args.quantize, compile=args.compile, mmproj=args.mmproj)
    from lfm2.compile import warm

    warm(llm.model, 1)  # before the first reply, not in the middle of it
    system = args.system
    history: list[dict[str, Any]] = []
    sampling = {**_sampling(args), **output}
    hide, last_thought = args.hide_reasoning, ""
    apply_image_args(llm, args)
    images = [_checked_image(path) for path in args.image or []]  # for the next message
    print("lfm2 chat. Commands: /reset (new conversation), /system TEXT (set the system prompt), "
          "/image FILE (attach an image to the next message), /exit; a reasoning model's thought: "
          "/thought (show the last one), /hide (hide or show them).")
    if tools:
        names = ", ".join(tool_schema(t)["function"]["name"] for t in tools)
        print(f"Tools offered: {names}. When the model calls one, type its result (JSON or text).")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            print("[conversation reset]")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            history = []
            print(f"[system prompt {'set' if system else 'cleared'}; conversation reset]")
            continue
        if text == "/thought":  # a hidden (collapsed) thought, expanded on demand
            if not last_thought:
                print("[the last reply had no thought]")
            else:
                printer = _ReplyPrinter(sys.stdout)
                printer.delta({"reasoning_content": last_thought})
                printer.close_thought()
            continue
        if text == "/hide":
            hide = not hide
            print(f"[thoughts {'hidden: /thought shows the last one' if hide else 'shown'}]")
            continue
        if text.startswith("/image"):
            try:
                if llm.vision is None:
                    raise LFM2Error("this model reads text only: /image needs a vision model (LFM2-VL)")
                images.append(_checked_image(text[len("/image") :].strip()))
                print(f"[{len(images)} image(s) attached to your next message]")
            except LFM2Error as exc:
                print(f"[{exc}]")
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}; use /reset, /system TEXT, /image FILE, /thought, /hide "
                  "or /exit]")
            continue
        start = len(history)
        if images:
            parts = [{"type": "image_url", "image_url": {"url": path}} for path in images]
            history.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})
            images = []
        else:
            history.append({"role": "user", "content": text})
        while True:  # until the model answers without calling a tool
            messages = ([{"role": "system", "content": system}] if system else []) + history
            reply, thought, calls = "", "", []
            printer = _ReplyPrinter(sys.stdout, hide)
            try:
                for delta in llm.chat_stream(messages, tools=tools, strict_tools=args.strict_tools or None,
                                             **sampling):
                    reply += delta.get("content", "")
                    thought += delta.get("reasoning_content", "")
                    calls += delta.get("tool_calls", [])
                    printer.delta(delta)
                printer.end()
            except KeyboardInterrupt:
                printer.end(interrupted=True)
                calls = []
            last_thought = thought
            # The thought goes back with the reply: the chat template decides whether to keep it.
            turn: dict[str, Any] = {"role": "assistant", "content": reply}
            if thought:
                turn["reasoning_content"] = thought
            if calls:
                turn["tool_calls"] = calls
            history.append(turn)
            if args.verbose:
                _print_stats(llm)
            if not calls:
                break
            try:
                for call in calls:
                    result = input(f"[result of {call['function']['name']}]> ")
                    history.append({"role": "tool", "tool_call_id": call.get("id"), "content": result})
            except EOFError:
                print()
                return
            except KeyboardInterrupt:  # the request is given up, not the chat: a call without results is dropped
                del history[start:]
                print("\n[cancelled: the request and its tool calls are left out of the conversation]")
                break


def _checked_image(path: str) -> str:
    """An image file's path, once it decodes (a clear error now rather than at the next message)."""
    from lfm2.images import load_image

    if not path:
        raise LFM2Error("/image needs a file: /image photo.jpg")
    load_image(path)
    return str(Path(path).expanduser().resolve())


def cmd_train(args: argparse.Namespace) -> None:
    from lfm2.train.trainer import TrainConfig, train

    try:
        cfg = TrainConfig.from_json(args.config)
    except (OSError, ValueError, TypeError) as e:
        raise LFM2Error(f"{args.config}: cannot read the training config ({e})") from None
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    out = train(cfg)
    print(f"done: metrics in {out / 'metrics.jsonl'}, loss curve in {out / 'loss.png'}, model in {out / 'model'}")


def cmd_bench(args: argparse.Namespace) -> None:
    from lfm2.bench import bench

    bench(args)


def cmd_quantize(args: argparse.Namespace) -> None:
    from lfm2.quant import quantize_checkpoint

    if args.group_size == "channel":
        group = None
    elif args.group_size.isdigit():
        group = int(args.group_size)
    else:
        raise LFM2Error(f"--group-size must be 32, 64, 128 or 'channel', got {args.group_size!r}")
    out = quantize_checkpoint(args.src, args.out, args.type, group, args.embedding_type)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({args.type}, group size {args.group_size}; {size / 2**20:.1f} MiB)")


def cmd_serve(args: argparse.Namespace) -> None:
    from lfm2.server import cmd_serve as run

    run(args)


def cmd_convert(args: argparse.Namespace) -> None:
    from lfm2.convert import cmd_convert as run

    run(args)


def cmd_finetune(args: argparse.Namespace) -> None:
    from lfm2.train.finetune import cmd_finetune as run

    run(args)


def cmd_merge(args: argparse.Namespace) -> None:
    from lfm2.merge import cmd_merge as run

    run(args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in _COMMANDS else ""
    args = build_parser(command).parse_args(argv)
    try:
        commands = {"generate": cmd_generate, "chat": cmd_chat, "train": cmd_train, "convert": cmd_convert,
                    "serve": cmd_serve, "finetune": cmd_finetune, "merge": cmd_merge,
                    "quantize": cmd_quantize, "bench": cmd_bench}
        commands[args.command](args)
    except LFM2Error as e:
        sys.stderr.write(f"lfm2: error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
