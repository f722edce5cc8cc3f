"""Chat templates and the exact assistant mask, for any template a model brings.

Most real templates (Qwen, Gemma, Phi, Llama) have no ``{% generation %}``
markers, so ``return_assistant_tokens_mask`` marks nothing and a run would
train zero tokens. ``ChatEncoder`` picks, once per tokenizer, the first way
that gives an exact mask:

1. ``markers``: the template has generation markers;
2. ``trl_variant``: TRL ships a generation-tagged training variant of this
   exact template (as TRL's own SFT uses it);
3. ``prefix``: the template preserves prefixes, so the tokens each assistant
   message adds to the rendered conversation are that message's;
4. otherwise the template is refused (``TemplateRefused``) before training.

Every method gives character spans of the rendered text; one tokenization
with offsets turns them into the mask, as transformers does for markers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from sft_cluster.data.records import DataError
from sft_cluster.spec.templates import builtin_template_names

__all__ = ["ChatEncoder", "TemplateRefused"]

Message = dict[str, Any]
Span = tuple[int, int]

# Conversations the template is checked on once: the shapes users bring.
_PLAIN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Red."},
]
_CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
_PROBES: dict[str, list[Message]] = {
    "multi-turn conversations with a system prompt": _PLAIN,
    "multi-turn conversations": _PLAIN[1:],
    "reasoning content": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Two and two."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6.", "reasoning_content": "Three and three."},
    ],
    "tool calls": [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "", "tool_calls": [_CALL]},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "5."},
    ],
}


class TemplateRefused(DataError):
    """The model's chat template cannot give an exact assistant mask; the message says the fix."""


def _clean(messages: Sequence[Message]) -> list[Message]:
    """Keys whose value is None dropped, as ``apply_chat_template`` does (templates test for presence)."""
    return [{k: v for k, v in message.items() if v is not None} for message in messages]


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """1 for each token whose characters overlap a trained span (spans sorted, disjoint)."""
    mask, at = [0] * len(offsets), 0
    for index, (start, end) in enumerate(offsets):
        while at < len(spans) and spans[at][1] <= start:
            at += 1
        if at < len(spans) and start < spans[at][1] and end > spans[at][0]:
            mask[index] = 1
    return mask


class ChatEncoder:
    """Token ids and the assistant mask of a conversation, by the model's own chat template.

    ``method`` says how the mask is found (see the module docstring; ``all``
    when every token is trained). ``notice`` is said once in the run when the
    training variant renders other tokens than the model's own template.
    """

    def __init__(self, tokenizer: Any, model_name: str, assistant_only: bool = True):
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise TemplateRefused(
                f"model {model_name}: its tokenizer has no chat template (a base model?), so there is no way "
                "to tell the assistant's tokens: set model.chat_template to a built-in name (chatml adds its "
                "special tokens; or one of: " + ", ".join(builtin_template_names()) + ") or a .jinja file"
            )
        self.tokenizer, self.model_name, self.original = tokenizer, model_name, template
        self._special = dict(tokenizer.special_tokens_map)
        self.notice: str | None = None
        try:
            self.template, self.method = self._choose(template)
        except TemplateRefused:
            if assistant_only:
                raise
            self.template, self.method = template, "all"  # every token is trained: any template will do
        self.end_of_turn_ids = self._end_of_turn()
        if not assistant_only:
            self.method = "all"

    def encode(
        self, messages: Sequence[Message], tools: list[Message] | None = None
    ) -> tuple[list[int], list[int]]:
        """(input_ids, mask) with 1 on the tokens trained; raises TemplateError or DataError for a
        conversation the template cannot render (the caller names the record)."""
        messages = _clean(messages)
        if self.method == "prefix":
            text, spans = self._prefix_spans(messages, tools)
        else:
            text, spans = self._marked_spans(self.template, messages, tools)
        self._check_rendered(text, messages)
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=self.method != "all")
        ids = list(out["input_ids"])
        if self.method == "all":
            return ids, [1] * len(ids)
        return ids, _mask_from_spans(out["offset_mapping"], spans)

    def _check_rendered(self, text: str, messages: list[Message]) -> None:
        """Raise DataError when the template left out part of a message (many drop tool calls,
        tool replies or reasoning they do not support): training on the rest would be wrong."""
        for index, message in enumerate(messages):
            pieces = {key: message.get(key) for key in ("content", "reasoning_content")}
            for number, call in enumerate(message.get("tool_calls") or []):
                function = call.get("function", call) if isinstance(call, dict) else {}
                pieces[f"tool_calls[{number}] name"] = function.get("name")
            for what, piece in pieces.items():
                piece = piece.strip() if isinstance(piece, str) else ""
                # Some templates render a string as JSON (Llama 3.1's tool replies).
                if piece and piece not in text and json.dumps(piece)[1:-1] not in text:
                    raise DataError(
                        f"the chat template of {self.model_name} does not render the {what} of message "
                        f"{index} ({message.get('role')}): it cannot train on this shape of conversation "
                        "(set model.chat_template to a template that supports it, or drop such records)"
                    )

    def render(self, messages: Sequence[Message], template: str | None = None, **options: Any) -> str:
        rendered, _ = render_jinja_template(
            [_clean(messages)], chat_template=template or self.template, **{**self._special, **options}
        )
        return rendered[0]

    def _marked_spans(
        self, template: str, messages: list[Message], tools: list[Message] | None
    ) -> tuple[str, list[Span]]:
        rendered, indices = render_jinja_template(
            [messages],
            tools=tools,
            chat_template=template,
            return_assistant_tokens_mask=True,
            **self._special,
        )
        return rendered[0], sorted(indices[0])

    def _prefix_spans(self, messages: list[Message], tools: list[Message] | None) -> tuple[str, list[Span]]:
        """Each assistant message's span: what rendering it adds after the prompt that asks for it."""
        full = self.render(messages, tools=tools)
        spans = []
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:index], tools=tools, add_generation_prompt=True)
            upto = full if index == len(messages) - 1 else self.render(messages[: index + 1], tools=tools)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DataError(
                    f"the chat template of {self.model_name} renders message {index} of this conversation "
                    "differently once later messages follow, so its trained tokens cannot be told apart "
                    "(set model.chat_template to a template with {% generation %} markers)"
                )
            spans.append((len(before), len(upto)))
        return full, spans

    def _choose(self, template: str) -> tuple[str, str]:
        """(template to tokenize with, method); refuses a template no method serves."""
        if has_generation_markers(template):
            return template, "markers"
        try:
            variant = get_training_chat_template(self.tokenizer)
        except (ValueError, TypeError, TemplateError):
            variant = None
        if variant is not None:
            self.notice = self._variant_differs(template, variant)
            return variant, "trl_variant"
        self.template = template
        problem = self._prefix_problem()
        if problem is None:
            return template, "prefix"
        raise TemplateRefused(
            f"model {self.model_name}: its chat template has no {{% generation %}} markers, TRL ships no "
            f"training variant of it, and {problem}, so the assistant's tokens cannot be told apart: set "
            "model.chat_template to a .jinja file with {% generation %} markers around each assistant "
            "message, or to a built-in template (" + ", ".join(builtin_template_names()) + ")"
        )

    def _prefix_problem(self) -> str | None:
        """Why ``self.template`` does not preserve prefixes on the probe conversations (None: it does)."""
        rendered_any = False
        for shape, probe in _PROBES.items():
            try:
                self.render(probe)
            except (TemplateError, TypeError, ValueError):
                continue  # a shape this template does not support is refused per record
            rendered_any = True
            try:
                self._prefix_spans(_clean(probe), None)
            except (DataError, TemplateError, TypeError, ValueError):
                return f"it renders earlier messages differently once more follow ({shape})"
        return None if rendered_any else "it renders none of the usual conversation shapes"

    def _variant_differs(self, original: str, variant: str) -> str | None:
        differs = []
        for shape, probe in _PROBES.items():
            try:
                ours = self.render(probe, original)
            except (TemplateError, TypeError, ValueError):
                continue
            if self.render(probe, variant) != ours:
                differs.append(shape)
        if not differs:
            return None
        return (
            f"the chat template of {self.model_name} is not prefix-preserving, so training uses TRL's "
            f"generation-tagged variant of it, which renders other tokens for {', '.join(differs)}; "
            "final/ keeps the model's own template"
        )

    def _end_of_turn(self) -> list[int]:
        """The special token that ends an assistant turn (what generation must stop at)."""
        probe = _PLAIN[1:4]
        try:
            text, spans = (
                self._prefix_spans(_clean(probe), None)
                if self.method == "prefix"
                else self._marked_spans(self.template, _clean(probe), None)
            )
        except (TemplateError, TypeError, ValueError, DataError):
            spans = []
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.get_added_vocab().values())
        if spans:
            out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            mask = _mask_from_spans(out["offset_mapping"], spans)
            trained = [t for t, m in zip(out["input_ids"], mask, strict=True) if m]
            for token in reversed(trained):
                if token in special:
                    return [token]
                if self.tokenizer.decode([token]).strip():
                    break
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []
