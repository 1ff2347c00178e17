"""`lfm2.load()`: a checkpoint directory or hub id in, a ready model (and tokenizer) out."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lfm2 import structured
from lfm2.config import ModelConfig
from lfm2.constrain import NoToolCalls, tool_call_constraint, wants_constraint
from lfm2.engine import Engine, Result, TokenLogprob
from lfm2.errors import CheckpointError, ConfigError, GenerationError
from lfm2.generate import logprob_entries, stream_text
from lfm2.images import FeatureCache, ImageLayout, ImageProcessor, load_image, split_images
from lfm2.images import batch as images_batch
from lfm2.loading import Loaded, parse_device, parse_dtype
from lfm2.models import build_model, cast_model
from lfm2.models.lfm2 import Lfm2ForCausalLM
from lfm2.models.lfm2_vl import Lfm2VlForConditionalGeneration, PromptEmbedder, VlConfig, is_vl_config
from lfm2.prefix_cache import PrefixCache
from lfm2.reasoning import AfterReasoning, ReplyParser, check_budget, parse_reply, prompt_opens_thinking, reasoning_tags
from lfm2.sampling import SamplingParams, choice_params
from lfm2.structured import OutputFormat
from lfm2.threads import release_openmp_workers
from lfm2.weights import load_into, move_to_huge_pages, resolve_checkpoint

DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class ChatPlan:
    """One chat request, ready for the engine and for reading its replies back.

    `ids`: the prompt. `forced`: text put in the model's mouth to honour `tool_choice`, already at
    the end of `ids` (empty for a reasoning model, whose forced call comes after its thought: see
    `lfm2.reasoning.AfterReasoning`). `tools`: those offered (None: none, or `tool_choice` "none";
    replies are then plain text). `constraint`: the logits processor of each reply (call `fresh()`
    per reply), or None. `reasoning`: whether replies are split into thought and answer
    (`lfm2.reasoning.reasoning_tags`); `started`: the prompt ends inside the thinking block.
    """

    ids: list[int]
    forced: str
    tools: list | None
    constraint: Any
    reasoning: bool = False
    started: bool = False
    images: list[ImageLayout] = field(default_factory=list)  # the prompt's images, preprocessed, in order
    embed: PromptEmbedder | None = None  # `Request.embed` where the prompt has images

    def parser(self) -> ReplyParser:
        """A fresh streaming parser for one reply (`lfm2.reasoning.ReplyParser`, `forced` already fed):
        feed it the generated text; it yields ("reasoning" | "content" | "tool_calls", value) events."""
        return ReplyParser(self.tools, self.reasoning, self.started, prefix=self.forced)

    def parse(self, text: str) -> tuple[str | None, str, list[dict[str, Any]]]:
        """(reasoning, content, tool_calls) of one whole reply; `text` is what the model generated."""
        return parse_reply(self.forced + text, self.tools, self.reasoning, self.started)


@dataclass
class LLM:
    """A loaded model: `.model` (the torch module), `.config`, `.tokenizer` (None if the checkpoint has none).

    Sampling keyword arguments, accepted by every generation method: `temperature` (0 means
    greedy), `top_k`, `top_p`, `min_p`, `repetition_penalty`, `presence_penalty`,
    `frequency_penalty`, `seed`; plus `max_new_tokens`, `stop` (strings) and `ignore_eos`. Unset
    ones default to the checkpoint's `generation_config.json`, else the model card's
    recommendation (temperature 0.3, min_p 0.15, repetition_penalty 1.05); `generation_defaults`,
    where set (a GGUF file's `general.sampling.*` keys), stands in for generation_config.json.
    `logprobs=k` (0-20) records each generated token's log-probability and its k best alternatives
    in `last_logprobs` (OpenAI's format; `chat` also returns them in the reply).

    Structured output (`lfm2.structured`), for `generate`, `stream`, `chat` and `chat_stream`: at
    most one of `json_schema=` (a dict or a pydantic model class), `regex=`, `choice=` (a list of
    strings) or `response_format=` (OpenAI's `{"type": "json_object"}` / `{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}`) holds the reply to it at any temperature.

    Every method runs on `lfm2.engine.Engine`, the same engine the server uses. States after the
    prompts and replies are kept in `prefix_cache` (bounded in bytes; `PrefixCache(0)` turns it
    off), so a conversation's next turn prefills only what is new.
    """

    model: Lfm2ForCausalLM
    config: ModelConfig
    tokenizer: Any
    path: Path
    generation_defaults: dict[str, Any] | None = None  # None: `path`'s generation_config.json
    last_stats: list[Result] = field(default_factory=list)
    last_logprobs: list[list[dict[str, Any]]] = field(default_factory=list)
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)
    # Strict tool calls choose each call's tool by its whole name's probability (`lfm2.constrain`);
    # False: token by token, as grammar-constrained decoding elsewhere does (for comparison).
    whole_tool_names: bool = True
    # LFM2-VL: the whole model (vision tower, projector, and `model` as its language model); None for text models.
    vision: Lfm2VlForConditionalGeneration | None = None
    # Its preprocessing (the checkpoint's settings); `max_image_tokens` etc. are the speed/quality dial.
    image_processor: ImageProcessor | None = None
    # Encoded images by content, so a later turn about the same image does not run the tower again.
    image_cache: FeatureCache = field(default_factory=FeatureCache)

    @classmethod
    def from_loaded(cls, loaded: Loaded) -> LLM:
        """The `LLM` over what a loader returned (`lfm2.gguf.load_gguf`)."""
        return cls(model=loaded.model, config=loaded.config, tokenizer=loaded.tokenizer, path=loaded.path,
                   generation_defaults=loaded.generation_defaults, vision=loaded.vision,
                   image_processor=loaded.image_processor)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # -- text ---------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[str], n: int = 1, **sampling: Any) -> str | list[str]:
        """Complete a prompt (or a batch of prompts, generated together); returns the new text.
        With `n` > 1, `n` completions of each prompt (a list, or a list of lists for a batch),
        decoded as rows of one batch that share the prompt's prefill."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = _check_n(n)
        sampling = dict(sampling)
        fmt = output_format(sampling)
        ids = [self._encode_text(p) for p in prompts for _ in range(n)]
        first = None if fmt is None else self.grammar(fmt)
        constraints = None if first is None else [first] + [first.fresh() for _ in ids[1:]]
        outs = [""] * len(ids)
        for row, piece in self._stream(ids, sampling, constraints, n=n):
            outs[row] += piece
        if n > 1:
            outs = [outs[i : i + n] for i in range(0, len(outs), n)]
        return outs[0] if isinstance(prompt, str) else outs

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Complete a prompt, yielding text pieces as they are generated."""
        sampling = dict(sampling)
        fmt = output_format(sampling)
        constraints = None if fmt is None else [self.grammar(fmt)]
        for _, piece in self._stream([self._encode_text(prompt)], sampling, constraints):
            yield piece

    # -- chat ---------------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict | Callable] | None = None,
        tool_choice: str | dict | None = None,
        run_tools: bool = False,
        max_rounds: int = 5,
        strict_tools: bool | None = None,
        reasoning: bool | None = None,
        max_reasoning_tokens: int | None = None,
        **sampling: Any,
    ) -> dict[str, Any]:
        """The assistant's reply to a conversation, as an OpenAI-style message dict.

        Tool calls the model makes come back in `tool_calls`. With `run_tools=True` (tools given
        as Python callables), the calls are run, each result (or the error it raised) is fed back
        as a `tool` message, and the loop continues until a reply without calls or `max_rounds`
        replies (the calls of the last one are returned, not run).
        The messages added along the way are appended to `messages` when it is a list.
        With `n` > 1 (no `run_tools`), a list of `n` replies, decoded together.

        `strict_tools` constrains the tokens of tool calls to the offered tools' schemas (see
        `lfm2.constrain`): True always, False never; None (default) when `tool_choice` forces a
        call or a tool asks for it with OpenAI's `"strict": true`.

        Reasoning models (`lfm2.reasoning`): the reply's thinking block comes back in
        `reasoning_content` (absent when there is none) and `content` holds the answer alone; tool
        calls are read from the answer only. `reasoning`: None decides from the model, False keeps
        the block in `content` as text, True splits whenever the vocabulary has the markers.
        `max_reasoning_tokens` closes the block after that many tokens so the model answers.
        An assistant message passed back with `reasoning_content` is rendered as the chat template
        decides (most keep the thought of the turns after the last user message only).
        """
        options = (strict_tools, reasoning, max_reasoning_tokens)
        if not run_tools:
            return self._chat_once(messages, tools, tool_choice, sampling, *options)
        if sampling.get("n", 1) != 1:
            raise GenerationError("run_tools=True follows one reply: n must be 1")
        from lfm2.tools import run_tool_calls

        functions = [t for t in tools or () if callable(t)]
        if not functions:
            raise GenerationError("run_tools=True needs tools given as Python callables")
        convo = messages if isinstance(messages, list) else list(messages)
        if max_rounds < 1:
            raise GenerationError(f"max_rounds={max_rounds} must be at least 1")
        for round_ in range(max_rounds):
            reply = self._chat_once(convo, tools, tool_choice, sampling, *options)
            convo.append(reply)
            if not reply.get("tool_calls") or round_ == max_rounds - 1:
                return reply  # a final answer, or out of rounds: the last calls are left to the caller
            convo.extend(run_tool_calls(reply["tool_calls"], functions))
            if tool_choice == "required" or isinstance(tool_choice, dict):
                tool_choice = None  # forcing a call every round would never let the model answer
        return reply

    def chat_stream(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict | Callable] | None = None,
        tool_choice: str | dict | None = None,
        strict_tools: bool | None = None,
        reasoning: bool | None = None,
        max_reasoning_tokens: int | None = None,
        **sampling: Any,
    ) -> Iterator[dict[str, Any]]:
        """Stream the assistant's reply as OpenAI-style deltas: `{"reasoning_content": str}` pieces of
        a reasoning model's thought first, then `{"content": str}` pieces of the answer as they come,
        and `{"tool_calls": [...]}` once a call block closes (text inside it is never shown).
        `reasoning` and `max_reasoning_tokens` as in `chat`."""
        sampling = dict(sampling)
        fmt = output_format(sampling)
        plan = self.chat_plan(messages, tools, tool_choice, strict_tools, reasoning, max_reasoning_tokens, output=fmt)
        if sampling.get("n", 1) != 1:
            raise GenerationError("chat_stream streams one reply: n must be 1")
        parser = plan.parser()
        for _, piece in self._stream([plan.ids], sampling, [plan.constraint], [self.turn_ends(plan.ids)],
                                     embeds=[plan.embed]):
            for kind, value in parser.feed(piece):
                yield {_DELTA_KEYS[kind]: value}
        for kind, value in parser.finish():
            yield {_DELTA_KEYS[kind]: value}

    def _chat_once(self, messages, tools, tool_choice, sampling, strict_tools=None, reasoning=None,
                   max_reasoning_tokens=None) -> dict | list[dict]:
        sampling = dict(sampling)
        n = _check_n(sampling.pop("n", 1))
        fmt = output_format(sampling)
        plan = self.chat_plan(messages, tools, tool_choice, strict_tools, reasoning, max_reasoning_tokens, output=fmt)
        constraints = [None if plan.constraint is None else plan.constraint.fresh() for _ in range(n)]
        texts = [""] * n
        for row, piece in self._stream([plan.ids] * n, sampling, constraints, [self.turn_ends(plan.ids)] * n, n,
                                       embeds=[plan.embed] * n):
            texts[row] += piece
        replies = []
        for row, text in enumerate(texts):
            thought, content, calls = plan.parse(text)
            reply: dict[str, Any] = {"role": "assistant", "content": content}
            if thought is not None:
                reply["reasoning_content"] = thought
            if calls:
                reply["tool_calls"] = calls
            if self.last_logprobs:
                reply["logprobs"] = {"content": self.last_logprobs[row]}
            replies.append(reply)
        return replies[0] if n == 1 else replies

    def turn_ends(self, ids: Sequence[int]) -> list[int]:
        """Prompt lengths at the end of each chat turn (after `<|im_end|>` and its newline): where
        the engine keeps states in the prefix cache, so the next turn's prompt, which repeats these
        turns, resumes from them."""
        tok = self._need_tokenizer()
        end = tok.token_to_id("<|im_end|>")
        if end is None:
            return []
        newline = tok.encode("\n", add_special_tokens=False)
        skip = newline[0] if len(newline) == 1 else None
        out = []
        for i, t in enumerate(ids):
            if t == end:
                out.append(i + 2 if i + 1 < len(ids) and ids[i + 1] == skip else i + 1)
        return out

    def chat_prompt(self, messages, tools, tool_choice, strict_tools=None,
                    output: OutputFormat | None = None) -> tuple[list[int], str, list | None, Any]:
        """`chat_plan`'s first four fields: prompt ids, forced text, tools offered, constraint."""
        plan = self.chat_plan(messages, tools, tool_choice, strict_tools, output=output)
        return plan.ids, plan.forced, plan.tools, plan.constraint

    def chat_plan(self, messages, tools=None, tool_choice=None, strict_tools=None, reasoning=None,
                  max_reasoning_tokens=None, answer_constraint=None, output: OutputFormat | None = None) -> ChatPlan:
        """Everything one chat request needs (`ChatPlan`): the prompt ids, the text we put in the
        model's mouth to honour `tool_choice`, the tools actually offered (None when there are none,
        or `tool_choice` is "none"), the reply's logits processor, and how to read replies back.

        The processor is None when nothing is constrained, the tool-call constraint when calls are
        constrained, and `NoToolCalls` (the call markers masked) when no tools are offered, since a
        call to nothing is text the user would see. `answer_constraint` (a logits processor of the
        engine's protocol, e.g. a grammar for structured output) replaces all of these. For a
        reasoning model the processor is wrapped in `AfterReasoning`, so that it applies to the
        answer only and `max_reasoning_tokens` holds.

        `output` (structured output) holds the answer to a format: the whole answer when no tools
        are offered; with tools and `tool_choice` "auto", the answer is the format or strict tool
        calls (the model still chooses); an answer forced into a call is the call. Strict calls to
        tools whose parameters say more than a type (ranges, patterns, nested objects...) are held
        to their full schemas by the grammar engine (`lfm2.structured.calls_constraint`).

        `"none"` leaves the tools out; `"required"` starts the reply with the call marker; a
        named function starts it with `<|tool_call_start|>[name(`, so the model must call it. A
        reasoning model thinks first: the call is forced after its thought (or at once where it
        does not open a thinking block), not in the prompt.
        """
        from lfm2.tools import render_chat

        tok = self._need_tokenizer()
        if tool_choice not in (None, "auto", "none", "required") and not (
            isinstance(tool_choice, dict) and isinstance(tool_choice.get("function", {}).get("name"), str)
        ):
            raise GenerationError(
                f"tool_choice={tool_choice!r}: expected 'auto', 'none', 'required' or "
                '{"type": "function", "function": {"name": ...}}'
            )
        if tool_choice == "required" or isinstance(tool_choice, dict):
            if not tools:
                raise GenerationError(f"tool_choice={tool_choice!r} needs tools")
        use_tools = tools if tools and tool_choice != "none" else None
        tags = reasoning_tags(tok, reasoning)
        budget = check_budget(max_reasoning_tokens, tags)
        messages, images = split_images(list(messages))
        if images and self.vision is None:
            raise GenerationError(f"{self.path}: this model reads text only; images need an LFM2-VL checkpoint")
        prompt = render_chat(tok, messages, use_tools, add_generation_prompt=True)
        layouts = [self.image_processor(load_image(image)) for image in images]
        if layouts:
            prompt = self.image_processor.expand(prompt, layouts)
        forced = ""
        if tool_choice == "required":
            forced = "<|tool_call_start|>["
        elif isinstance(tool_choice, dict):
            forced = f"<|tool_call_start|>[{tool_choice['function']['name']}("
        # A reasoning model's forced call comes after its thought: the processor forces it.
        in_prompt = "" if tags is not None else forced
        constraint, size, stops = None, self.config.vocab_size, sorted(tok.stop_ids)
        lead = tags is not None  # the blank line a thought ends with reaches the answer's grammar
        strict = bool(use_tools) and wants_constraint(use_tools, tool_choice, strict_tools)
        if answer_constraint is not None:
            constraint = answer_constraint
        elif use_tools and (output is not None or (strict and structured.needs_full_schemas(use_tools))):
            # full argument schemas (and the answer's format) need the grammar engine's calls
            constraint = structured.calls_constraint(output, use_tools, tok, size, stops, in_prompt,
                                                     self.whole_tool_names, must_call=bool(forced), lead_space=lead)
        elif output is not None:
            constraint = structured.constraint(output, tok, size, stops, lead_space=lead)
        elif not use_tools:
            constraint = NoToolCalls.for_tokenizer(tok, size)
        elif strict:
            constraint = tool_call_constraint(tok, use_tools, in_prompt, size, self.whole_tool_names)
        started = tags is not None and prompt_opens_thinking(prompt)
        if tags is not None and (constraint is not None or budget is not None or forced):
            after = tok.encode(forced, add_special_tokens=False) if forced else ()
            constraint = AfterReasoning(constraint, tags, self.config.vocab_size, budget, started, after)
        ids = tok.encode(prompt + in_prompt, add_special_tokens=False)
        embed = self._image_embedder(ids, layouts) if layouts else None
        return ChatPlan(ids, in_prompt, use_tools, constraint, tags is not None, started, layouts, embed)

    def _image_embedder(self, ids: list[int], layouts: list[ImageLayout]) -> PromptEmbedder:
        """The engine's `Request.embed` for a prompt with images, kept in `image_cache` by content for
        later turns. The images past the longest prefix the prefix cache holds are encoded (vision
        tower and projector) here, in the caller's thread: the server's engine thread goes on decoding
        other requests meanwhile instead of stalling on the tower."""
        embedder = self.vision.prompt_embedder(ids, [x.num_tokens for x in layouts], [x.digest for x in layouts],
                                               lambda indices: self.image_cache.get([layouts[i] for i in indices],
                                                                                    self._encode_images))
        resumed = self.prefix_cache.longest(embedder.key) if self.prefix_cache.max_bytes else None
        embedder.prefetch(0 if resumed is None else len(resumed.key))
        return embedder

    def _encode_images(self, layouts: list[ImageLayout]) -> list[torch.Tensor]:
        """Each image's features (its tiles' tokens in order), from one pass of the vision tower."""
        with torch.inference_mode():
            tiles = self.vision.image_features(**images_batch(layouts))
        out, i = [], 0
        for x in layouts:
            n = x.pixel_values.shape[0]
            out.append(torch.cat(tiles[i : i + n]))
            i += n
        return out

    # -- plumbing -----------------------------------------------------------------------------

    def sampling_params(self, **sampling: Any) -> SamplingParams:
        """The checkpoint's defaults (or the model card's) with `sampling` applied on top."""
        defaults = self.path if self.generation_defaults is None else self.generation_defaults
        return SamplingParams.from_generation_config(defaults, **sampling)

    def grammar(self, fmt: OutputFormat) -> structured.GrammarConstraint:
        """A checked constraint holding a plain completion to `fmt`, ending on the tokenizer's stop
        ids (what `generate`, `stream` and the server's text completions use)."""
        tok = self._need_tokenizer()
        return structured.constraint(fmt, tok, self.config.vocab_size, sorted(tok.stop_ids))

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise GenerationError(f"{self.path}: the checkpoint has no tokenizer.json, so it cannot take text")
        return self.tokenizer

    def _encode_text(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt must be a string, got {type(prompt).__name__}")
        return self._need_tokenizer().encode(prompt, add_special_tokens=True)

    def engine(self, max_batch: int = 1, max_len: int | None = None) -> Engine:
        """An engine on this model for `max_batch` rows of `max_len` slots, sharing `prefix_cache`."""
        pad = self.tokenizer.pad_id if self.tokenizer is not None and self.tokenizer.pad_id is not None else 0
        return Engine(self.model, max_batch=max_batch, max_queue=0, max_len=max_len, pad_id=pad,
                      prefix_cache=self.prefix_cache)

    def _stream(self, prompts: list[list[int]], sampling: dict[str, Any], constraints: Sequence[Any] | None = None,
                checkpoints: Sequence[Sequence[int]] | None = None, n: int = 1,
                embeds: Sequence[Any] | None = None) -> Iterator[tuple[int, str]]:
        """Text pieces (row, piece) of every prompt's reply; rows come in groups of `n` choices of
        one prompt, each choice with its own seed (`choice_params`)."""
        sampling = dict(sampling)
        if sampling.get("n", 1) != 1:
            raise GenerationError("n is an argument of generate and chat")
        sampling.pop("n", None)
        logprobs = sampling.pop("logprobs", None)
        if logprobs is True:
            logprobs = 0
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 20):
            raise GenerationError(f"logprobs={logprobs!r}: give how many alternatives to report per token (0-20)")
        max_new_tokens = sampling.pop("max_new_tokens", None)
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        stop = sampling.pop("stop", None) or ()
        ignore_eos = bool(sampling.pop("ignore_eos", False))
        params = self.sampling_params(**sampling)
        max_new_tokens = min(max_new_tokens, self.config.max_position_embeddings - max(map(len, prompts)))
        if max_new_tokens < 1:
            raise GenerationError(
                f"the prompt ({max(map(len, prompts))} tokens) fills the model's context of "
                f"{self.config.max_position_embeddings} tokens"
            )
        self.last_stats, self.last_logprobs = [], []
        longest = max(map(len, prompts))
        engine = self.engine(max_batch=len(prompts), max_len=max(2, longest + max_new_tokens))
        tok = self._need_tokenizer()
        found: list[list[TokenLogprob]] = []
        rows = [choice_params(params, r % n) for r in range(len(prompts))]
        yield from stream_text(engine, tok, prompts, rows, max_new_tokens, stop, ignore_eos, self.last_stats,
                               constraints, checkpoints, logprobs, found, embeds)
        if logprobs is not None:
            self.last_logprobs = [logprob_entries(tok, items) for items in found]


def output_format(sampling: dict[str, Any]) -> OutputFormat | None:
    """Take the structured-output argument out of `sampling` (see `LLM`): at most one of them."""
    taken = {k: sampling.pop(k, None) for k in ("json_schema", "regex", "choice", "response_format")}
    given = {k: v for k, v in taken.items() if v is not None}
    if len(given) > 1:
        raise GenerationError(f"give one structured-output argument, not {' and '.join(given)}")
    if not given:
        return None
    (key, value), = given.items()
    if isinstance(value, OutputFormat):
        return value
    if key == "json_schema":
        return structured.json_schema(value)
    if key == "regex":
        return structured.regex(value)
    if key == "choice":
        return structured.choice(value)
    return structured.response_format(value)


_DELTA_KEYS = {"reasoning": "reasoning_content", "content": "content", "tool_calls": "tool_calls"}


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GenerationError(f"n={n!r} must be a positive integer (how many replies to generate)")
    return n


def load(
    path_or_hub_id: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    adapter: str | os.PathLike | None = None,
    quantize: str | None = None,
    group_size: int | None = 32,
    compile: bool | None = None,
    mmproj: str | os.PathLike | None = None,
) -> LLM:
    """Load an LFM2 / LFM2-MoE / LFM2-VL checkpoint: a Hugging Face-layout directory, a hub id or a `.gguf` file.

    With no argument, the bundled tiny model (`lfm2.default_model_path()`). The weights are
    checked against `config.json` before anything is built (a missing or misshapen tensor raises
    `CheckpointError` naming it); float32 weights loaded as float32 stay memory-mapped instead of
    being copied. `adapter` attaches a LoRA adapter directory (PEFT format, e.g. written by
    `lfm2 finetune`); its tensors are checked against the model's shapes.

    `quantize="int8"|"int4"` quantizes every linear layer and the embedding/head after loading
    (`group_size` 32, 64, 128, or None for int8 per channel; see `lfm2.quant`); an adapter is then
    folded into the weights first. A checkpoint written by `lfm2 quantize` loads quantized as it
    is, without float32 weights. A GGUF file's Q8_0 / Q4_0 tensors become int8 / int4 layers
    directly when `quantize` names that format, and by default on the CPU when the file's weight
    matrices are mostly of one of those types (it keeps its own format, as in llama.cpp); a file
    of K-quants (Q4_K_M / Q5_K_M / Q6_K files) runs its Q4_K / Q5_K / Q6_K blocks as they are
    (`lfm2.kquant`; int8 layers where the kernels did not build) and requantizes matrices of other
    block types to int8 as it reads them (`lfm2.gguf.load_model`); `quantize="none"` dequantizes
    them to `dtype` instead.

    Decode steps run fused by default (`lfm2.step`: every block of a step in one C++ call through lfm2's
    kernels, the eager model's results, nothing to compile) where that fits the model: float32 on the
    CPU with the kernels built, layers as wide as LFM2-350M's, no unmerged adapters. Models it does not
    fit decode through `torch.compile` (`lfm2.compile`) on the CPU if they are of real size (LFM2-350M
    and up; `lfm2.compile.auto_compile`); `compile=True` compiles for any model: the step compiles at
    the first decode step (about a minute for LFM2-350M on 2 cores, about ten seconds once inductor's
    disk cache holds it; MoE models several minutes, under a minute cached). `compile=False` decodes
    eagerly, module by module (`LFM2_COMPILE=0` turns the default compile off, not the fused step).
    Where compiling fails, decoding stays eager.

    `mmproj` is the vision part of an LFM2-VL model as llama.cpp keeps it (an mmproj .gguf file, written
    by `lfm2 convert` or llama.cpp's converter), beside a `.gguf` text model: the LLM then reads images
    (`vision`, `image_processor`), as one loaded from the LFM2-VL checkpoint directory does.

    An LFM2-VL model (`llm.vision`) takes all three on its language model, `llm.model`: `quantize`
    and `lfm2 quantize` leave the vision tower and projector float (in `dtype`); an adapter adapts the
    language model's projections, under the names PEFT gives them on transformers' LFM2-VL (`lfm2.lora`);
    the fused or compiled decode step is the language model's, which is all decoding runs (images reach the
    model once, as the prefill's `inputs_embeds`).
    """
    native = quantize is None  # a GGUF file's own Q8_0 / Q4_0 blocks, where nothing else is asked
    if quantize == "none":
        quantize = None
    if quantize is not None:
        from lfm2.quant import check_format

        check_format(quantize, group_size)
    if path_or_hub_id is None:
        from lfm2.bundled import require_default_model

        path_or_hub_id = require_default_model()
    if str(path_or_hub_id).endswith(".gguf"):
        from lfm2.gguf import load_gguf

        loaded = load_gguf(path_or_hub_id, dtype=dtype, device=device, quantize=quantize, group_size=group_size,
                           native=native and adapter is None, mmproj=mmproj)
        return _ready(_with_adapter(LLM.from_loaded(loaded), adapter), compile)
    if mmproj is not None:
        raise ConfigError(f"mmproj={str(mmproj)!r} goes with a .gguf text model; {path_or_hub_id} is a checkpoint "
                          "directory or hub id, which holds its vision part itself (load it without mmproj=)")
    ckpt = resolve_checkpoint(path_or_hub_id)
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    vl = is_vl_checkpoint(ckpt)
    if vl:
        model = build_vl_model(ckpt)
        model.to(dtype)
    else:
        config = ModelConfig.from_json(ckpt / "config.json")
        model = build_model(config, device="meta")
        cast_model(model, dtype)
    from lfm2.quant import load_quantized_into, load_quantizing, quantize_model, read_quantization

    stored = read_quantization(ckpt)
    if stored is not None:
        if quantize is not None and (quantize, group_size) != (stored["type"], stored.get("group_size")):
            raise ConfigError(f"{ckpt} is already quantized ({stored['type']}, group size {stored.get('group_size')}); "
                              "load it without quantize=, or quantize the float checkpoint")
        if adapter is not None:
            raise ConfigError(f"{ckpt} is quantized; LoRA adapters apply to float checkpoints (load the float "
                              "model with adapter= and quantize=, which folds the adapter in before quantizing)")
        load_quantized_into(model, ckpt, device)
    elif quantize is not None and adapter is None:
        # Quantized as it is read, tensor by tensor (never the float model in memory); the quantized
        # model moves onto huge pages below.
        load_quantizing(model, ckpt, quantize, group_size, device)
    else:
        # An adapter is folded into the float weights before quantizing (below): those stay
        # memory-mapped meanwhile.
        load_into(model, ckpt, device, huge_pages=quantize is None)
    model.eval()
    if vl:
        llm = LLM(model=model.language, config=model.config.text, tokenizer=_load_tokenizer(ckpt), path=ckpt,
                  vision=model, image_processor=ImageProcessor.from_dir(ckpt))
    else:
        llm = LLM(model=model, config=config, tokenizer=_load_tokenizer(ckpt), path=ckpt)
    if quantize is not None and stored is None:
        if adapter is not None:
            from lfm2.lora import merge_lora

            merge_lora(_trainable(_with_adapter(llm, adapter)))
            adapter = None
            quantize_model(model, quantize, group_size)  # a vision model: its language model only
            if device.type == "cpu":
                move_to_huge_pages(model)  # (`load_quantizing` reads into huge pages itself)
    return _ready(_with_adapter(llm, adapter), compile)


def is_vl_checkpoint(ckpt: Path) -> bool:
    """Whether a checkpoint directory holds an LFM2-VL model (by its config.json's model_type)."""
    try:
        raw = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # ModelConfig.from_json reports what is wrong with the file
    return isinstance(raw, dict) and is_vl_config(raw)


def build_vl_model(ckpt: str | os.PathLike) -> Lfm2VlForConditionalGeneration:
    """The LFM2-VL model a checkpoint directory's config.json describes, on the meta device (no weights)."""
    ckpt = Path(ckpt)
    try:
        raw = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{ckpt / 'config.json'}: cannot read ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{ckpt / 'config.json'}: expected a JSON object")
    config = VlConfig.from_dict(raw, source=str(ckpt / "config.json"))
    with torch.device("meta"):
        return Lfm2VlForConditionalGeneration(config)


def load_vl_model(ckpt: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Lfm2VlForConditionalGeneration:
    """The LFM2-VL model of a float checkpoint directory (config.json + safetensors), checked tensor by tensor."""
    model = build_vl_model(ckpt)
    model.to(dtype)
    load_into(model, Path(ckpt), device)
    return model.eval()


def _ready(llm: LLM, compile: bool | None) -> LLM:
    """The loaded model: its int4 layers in tiles where faster, its decode step set to compile, and the
    loading thread's OpenMP workers given back: an application that loads in one thread and generates in
    another (a worker pool, a web framework's threads) would otherwise decode at a third of the speed
    (`lfm2.threads`)."""
    from lfm2.compile import auto_compile, compile_decode
    from lfm2.quant import pack_tiles
    from lfm2.step import fuse_decode

    pack_tiles(llm.model)  # int4 into the decode kernel's 16-row tiles, on CPUs where they are faster
    if compile or (compile is None and fuse_decode(llm.model) is None and auto_compile(llm.model)):
        compile_decode(llm.model)
    release_openmp_workers()
    return llm


def _trainable(llm: LLM) -> torch.nn.Module:
    """The module adapters attach to: a vision model whole (`lfm2.lora` adapts its language model only,
    under the vision model's names, as PEFT on transformers' model names them), else the model."""
    return llm.vision if llm.vision is not None else llm.model


def _with_adapter(llm: LLM, adapter: str | os.PathLike | None) -> LLM:
    if adapter is not None:
        from lfm2.lora import load_adapter

        load_adapter(_trainable(llm), adapter)
        _trainable(llm).eval()
    return llm


def _load_tokenizer(ckpt: Path) -> object | None:
    if not (ckpt / "tokenizer.json").is_file():
        return None
    from lfm2.tokenizer import Tokenizer

    return Tokenizer.from_dir(ckpt)


__all__ = ["LLM", "ChatPlan", "load", "parse_device", "parse_dtype", "CheckpointError"]
