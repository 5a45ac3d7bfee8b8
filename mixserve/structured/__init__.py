"""Structured outputs: constraints (JSON schema, any JSON, regex, choice, Lark/GBNF grammar) applied as
token masks in the sampler, and OpenAI tool calling on top of them.

`spec` (no torch) says what is asked; `constraints` (runner side, llguidance) holds each request's
grammar state and computes the step's masks; `tools` renders tool definitions, builds the grammar of
forced tool calls and parses calls out of generated text.
"""

from mixserve.structured.spec import StructuredError, StructuredOutput

__all__ = ["StructuredError", "StructuredOutput"]
