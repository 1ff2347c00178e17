"""The exceptions lfm2 raises for bad input, in one place.

Every error names what was wrong (the file, the tensor, the field), what was expected and what
was found, so a user can act on the message alone without reading a stack trace.
"""


class LFM2Error(Exception):
    """Base class of every error lfm2 raises on purpose."""


class ConfigError(LFM2Error):
    """A `config.json` (or GGUF metadata) is missing, malformed or describes an unsupported model."""


class CheckpointError(LFM2Error):
    """A weights file is missing, truncated, or holds tensors of the wrong name or shape."""


class TokenizerError(LFM2Error):
    """Tokenizer files are missing or inconsistent, or a chat template cannot be rendered."""


class GenerationError(LFM2Error):
    """A generation request is invalid (bad sampling value, prompt longer than the context, ...)."""


class ToolError(GenerationError):
    """A tool definition, a tool call or a message carrying tool calls is malformed.

    A subclass of `GenerationError` so that code which turns bad requests into HTTP 400s or CLI
    messages by catching `GenerationError` handles bad tools the same way.
    """


class SchedulerBusy(LFM2Error):
    """The generation queue is full: try again later (the server answers 429 with Retry-After)."""
