"""The assistant mask of each real model family's own chat template (issue #13).

Tiny random models of six families (``tests/fixtures/families.py``) carry their
ORIGINAL templates, none with ``{% generation %}`` markers. Where TRL ships a
generation-tagged training variant, the encoder's ids and mask equal what that
variant gives through ``apply_chat_template``; for Llama 3.1 (no variant) the mask
is derived from growing prefixes, and this test locates each assistant message's
content and its ``<|eot_id|>`` in the rendered text by itself. On every family and
every conversation shape the template renders, the mask is checked against the
messages' own text: the assistant's content, reasoning and tool calls are trained,
system, user and tool text is not, no turn header is trained, and each trained span
ends with the end-of-turn token.
"""

from __future__ import annotations

import json

import pytest
from jinja2 import TemplateError
from transformers import AutoTokenizer

from sft_cluster.data import DataError
from sft_cluster.data.chat import ChatEncoder, TemplateRefused
from tests.fixtures.families import FAMILIES, REPO, build_tokenizer, family_models  # noqa: F401 - fixture

SYSTEM_MULTI = [
    {"role": "system", "content": "You answer in one short line."},
    {"role": "user", "content": "Hi there, who are you?"},
    {"role": "assistant", "content": "I am a small test model."},
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Two plus three is five."},
    {"role": "user", "content": "And times four?"},
    {"role": "assistant", "content": "  Twenty, if you mean five times four.\n"},
]
NO_SYSTEM = SYSTEM_MULTI[1:5]
SINGLE_TURN = SYSTEM_MULTI[1:3]

MULTIPLY = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiply two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def _call(a: int, b: int) -> dict:
    return {"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}


TOOL_CALL = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "What is six times seven?"},
    {"role": "assistant", "content": "", "tool_calls": [_call(6, 7)]},
    {"role": "tool", "name": "multiply", "content": "forty-two exactly"},
    {"role": "assistant", "content": "Six times seven is forty-two."},
]
TWO_TOOL_CALLS = [
    {"role": "user", "content": "Multiply six by seven, and eight by nine."},
    {"role": "assistant", "content": "Let me work both out.", "tool_calls": [_call(6, 7), _call(8, 9)]},
    {"role": "tool", "name": "multiply", "content": "forty-two exactly"},
    {"role": "tool", "name": "multiply", "content": "seventy-two exactly"},
    {"role": "assistant", "content": "They are forty-two and seventy-two."},
]
REASONING = [
    {"role": "system", "content": "Think before you answer."},
    {"role": "user", "content": "Hello, are you awake?"},
    {"role": "assistant", "content": "Yes, I am here.", "reasoning_content": "The user greets me, be kind."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It makes four.", "reasoning_content": "Two and two make four, simple."},
]
REASONING_TOOLS = [
    {"role": "user", "content": "What is six times seven?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should call the multiply tool.",
        "tool_calls": [_call(6, 7)],
    },
    {"role": "tool", "name": "multiply", "content": "forty-two exactly"},
    {"role": "assistant", "content": "It is forty-two.", "reasoning_content": "The tool said so."},
]

# (name, messages, tools) the original templates render; each family gets those its template supports.
PLAIN_SHAPES = [
    ("system_multi", SYSTEM_MULTI, None),
    ("no_system", NO_SYSTEM, None),
    ("single", SINGLE_TURN, None),
]
TOOL_SHAPES = [("tool_call", TOOL_CALL, [MULTIPLY])]
SHAPES: dict[str, list] = {
    "llama3": PLAIN_SHAPES,
    "llama3_1": PLAIN_SHAPES + TOOL_SHAPES,  # one tool call per turn at most (the template raises on two)
    "qwen2_5": PLAIN_SHAPES + TOOL_SHAPES + [("two_tool_calls", TWO_TOOL_CALLS, [MULTIPLY])],
    "qwen3": PLAIN_SHAPES
    + TOOL_SHAPES
    + [
        ("two_tool_calls", TWO_TOOL_CALLS, [MULTIPLY]),
        ("reasoning", REASONING, None),
        ("reasoning_tools", REASONING_TOOLS, [MULTIPLY]),
    ],
    "gemma3": PLAIN_SHAPES,  # the system prompt folds into the first user turn
    "phi3": PLAIN_SHAPES,  # has a system role
}
CASES = [(family, shape) for family, shapes in SHAPES.items() for shape, _, _ in shapes]

# Tokens that open or name a turn: never trained.
HEADER_TOKENS = {
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|im_start|>",
    "<bos>",
    "<start_of_turn>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
}


def _shape(family: str, name: str) -> tuple[list[dict], list[dict] | None]:
    return next((messages, tools) for shape, messages, tools in SHAPES[family] if shape == name)


@pytest.fixture(scope="module")
def tokenizers(family_models) -> dict:  # noqa: F811 - the fixture imported above
    return {name: AutoTokenizer.from_pretrained(folder) for name, folder in family_models.items()}


@pytest.fixture(scope="module")
def encoders(tokenizers) -> dict[str, ChatEncoder]:
    return {name: ChatEncoder(tok, f"tiny-{name}") for name, tok in tokenizers.items()}


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of 1s as [start, end) token indices."""
    spans, start = [], None
    for index, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = index
        elif not bit and start is not None:
            spans.append((start, index))
            start = None
    return spans


def _offsets(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(out["input_ids"]) == ids, "the encoder's ids are not the tokens of the rendered template"
    return [tuple(o) for o in out["offset_mapping"]]


def _token_bits(offsets, mask, start: int, end: int) -> set[int]:
    """Mask bits of the tokens overlapping characters [start, end)."""
    return {bit for (s, e), bit in zip(offsets, mask, strict=True) if s < end and e > start}


def _pieces(message: dict) -> list[str]:
    """The message's own text as a template renders it, in rendering order (reasoning, content, calls)."""
    pieces = []
    if message.get("reasoning_content"):
        pieces.append(message["reasoning_content"].strip())
    if message.get("content", "").strip():
        pieces.append(message["content"].strip())
    for call in message.get("tool_calls", []):
        pieces += [call["function"]["name"], json.dumps(call["function"]["arguments"])]
    return pieces


def _check_against_text(tokenizer, text: str, messages, ids: list[int], mask: list[int]) -> None:
    """What each message's own text gets in the mask, found in the rendered text independently."""
    offsets = _offsets(tokenizer, text, ids)
    cursor = 0
    for index, message in enumerate(messages):
        trained = message["role"] == "assistant"
        end_of_message = cursor
        for piece in _pieces(message):
            at = text.find(piece, cursor)
            if at < 0:
                assert trained and piece == message.get("reasoning_content", "").strip(), (index, piece)
                continue  # an original template may drop the reasoning of earlier turns
            bits = _token_bits(offsets, mask, at, at + len(piece))
            assert bits == {int(trained)}, (message["role"], index, piece, bits)
            end_of_message = max(end_of_message, at + len(piece))
        cursor = end_of_message
    header_ids = {tokenizer.convert_tokens_to_ids(t) for t in HEADER_TOKENS if t in tokenizer.get_vocab()}
    trained_headers = [t for t, m in zip(ids, mask, strict=True) if m and t in header_ids]
    assert not trained_headers, tokenizer.convert_ids_to_tokens(trained_headers)


def _check_spans_end_of_turn(spec, tokenizer, ids, mask, messages) -> None:
    """One trained span per assistant message, each ending (whitespace aside) with the end-of-turn token
    or, for a template that trains its closing eos (Phi-3's last turn), with an eos of the model."""
    stops = {tokenizer.convert_tokens_to_ids(spec.end_of_turn)} | {
        tokenizer.convert_tokens_to_ids(t) for t in spec.generation_eos
    }
    spans = _spans(mask)
    assert len(spans) == sum(m["role"] == "assistant" for m in messages), tokenizer.decode(ids)
    for start, end in spans:
        last = next(t for t in reversed(ids[start:end]) if tokenizer.decode([t]).strip())
        assert last in stops, (tokenizer.decode(ids[start:end]), tokenizer.convert_ids_to_tokens(last))


def _render(tokenizer, messages, tools, template: str | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=template)


# --- each family, each shape it renders ------------------------------------------------------------------


def test_fixture_families_are_what_the_matrix_needs(family_models, tokenizers):  # noqa: F811
    from transformers import AutoConfig

    assert sorted(family_models) == sorted(SHAPES)
    assert any(spec.tie_word_embeddings for spec in FAMILIES.values())
    for name, spec in FAMILIES.items():
        tok, config = tokenizers[name], AutoConfig.from_pretrained(family_models[name])
        assert tok.chat_template == spec.chat_template  # byte-identical: TRL recognises it
        assert "{% generation %}" not in tok.chat_template and "{%- generation" not in tok.chat_template
        assert spec.has_trl_variant == (name != "llama3_1")
        shapes = {shape for shape, _, _ in SHAPES[name]}
        assert ("tool_call" in shapes) == ("tools" in spec.shapes)
        assert ("reasoning" in shapes) == ("reasoning" in spec.shapes)
        assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tok)
        assert config.tie_word_embeddings == spec.tie_word_embeddings
        assert tok.convert_tokens_to_ids(spec.end_of_turn) not in (None, tok.unk_token_id)
        added = {t.content: t.special for t in tok.added_tokens_decoder.values()}
        assert all(added.get(token) is True for token in spec.special_tokens), added
        assert all(added.get(token) is False for token in spec.plain_added_tokens), added


@pytest.mark.parametrize("family", list(SHAPES))
def test_method_and_end_of_turn(encoders, tokenizers, family):
    encoder, spec = encoders[family], FAMILIES[family]
    assert encoder.method == ("trl_variant" if spec.has_trl_variant else "prefix")
    assert tokenizers[family].convert_tokens_to_ids(spec.end_of_turn) in encoder.end_of_turn_ids


@pytest.mark.parametrize(("family", "shape"), CASES)
def test_mask_on_family_template(encoders, tokenizers, family, shape):
    spec, tok, encoder = FAMILIES[family], tokenizers[family], encoders[family]
    messages, tools = _shape(family, shape)
    ids, mask = encoder.encode(messages, tools=tools)
    assert len(ids) == len(mask) and sum(mask) > 0

    if spec.has_trl_variant:
        expected = tok.apply_chat_template(
            messages,
            tools=tools,
            chat_template=spec.training_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert ids == list(expected["input_ids"])
        assert mask == list(expected["assistant_masks"]), _diff(tok, ids, mask, expected["assistant_masks"])
        text = _render(tok, messages, tools, spec.training_template)
    else:
        text = _render(tok, messages, tools)
    if encoder.notice is None:
        assert ids == tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
    _check_against_text(tok, text, messages, ids, mask)
    _check_spans_end_of_turn(spec, tok, ids, mask, messages)


def _llama3_1_expected_mask(tok, text: str, messages, ids) -> list[int]:
    """Each assistant message as Llama 3.1 renders it (content trimmed, or its one tool call as JSON with
    "parameters") right after the assistant header, plus the <|eot_id|> that follows: found by str.find."""
    header, eot = "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"
    spans, cursor = [], 0
    for message in messages:
        if message["role"] != "assistant":
            continue
        if message.get("tool_calls"):
            (call,) = message["tool_calls"]
            fn = call["function"]
            body = '{"name": "' + fn["name"] + '", "parameters": ' + json.dumps(fn["arguments"]) + "}"
        else:
            body = message["content"].strip()
        at = text.find(header + body + eot, cursor)
        assert at >= 0, (body, text[cursor:])
        start = at + len(header)
        spans.append((start, start + len(body) + len(eot)))
        cursor = start + len(body) + len(eot)
    offsets = _offsets(tok, text, ids)
    mask = []
    for s, e in offsets:
        inside = any(a <= s and e <= b for a, b in spans)
        straddles = any(s < b and e > a for a, b in spans) and not inside
        assert not straddles, (s, e, text[s:e])
        mask.append(int(inside))
    return mask


@pytest.mark.parametrize("shape", [shape for shape, _, _ in SHAPES["llama3_1"]])
def test_llama3_1_prefix_mask_is_each_assistant_message_and_its_eot(encoders, tokenizers, shape):
    tok, encoder = tokenizers["llama3_1"], encoders["llama3_1"]
    messages, tools = _shape("llama3_1", shape)
    ids, mask = encoder.encode(messages, tools=tools)
    text = _render(tok, messages, tools)
    assert ids == tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
    expected = _llama3_1_expected_mask(tok, text, messages, ids)
    assert mask == expected, _diff(tok, ids, mask, expected)


def _diff(tok, ids, got, want) -> str:
    """The tokens where two masks disagree, for the failure message."""
    rows = [
        f"{i}: {tok.convert_ids_to_tokens(t)!r} got {g} want {w}"
        for i, (t, g, w) in enumerate(zip(ids, got, want, strict=False))
        if g != w
    ]
    return "\n".join(rows[:20]) or f"lengths {len(got)} vs {len(want)}"


# --- what the TRL variants change ----------------------------------------------------------------------


def test_qwen3_says_its_variant_renders_other_tokens(encoders, tokenizers):
    """Qwen3's original drops the think block of assistant turns before the last user query (and renders
    an empty one only on the last turn); the variant renders one on every turn. Training uses the
    variant's tokens, and the encoder says so."""
    tok, encoder, spec = tokenizers["qwen3"], encoders["qwen3"], FAMILIES["qwen3"]
    original = _render(tok, SYSTEM_MULTI, None)
    variant = _render(tok, SYSTEM_MULTI, None, spec.training_template)
    assert original != variant and variant.count("<think>") == 3 and original.count("<think>") == 1
    ids, _ = encoder.encode(SYSTEM_MULTI)
    assert ids == tok(variant, add_special_tokens=False)["input_ids"]
    assert isinstance(encoder.notice, str) and encoder.notice
    # the reasoning of an earlier turn is dropped by the original and trained through the variant
    assert REASONING[2]["reasoning_content"] not in _render(tok, REASONING, None)
    assert REASONING[2]["reasoning_content"] in _render(tok, REASONING, None, spec.training_template)


@pytest.mark.parametrize("family", [f for f in SHAPES if f != "qwen3"])
def test_other_families_train_their_own_tokens(encoders, tokenizers, family):
    encoder, tok = encoders[family], tokenizers[family]
    for _, messages, tools in SHAPES[family]:
        ids, _ = encoder.encode(messages, tools=tools)
        assert ids == tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
    assert encoder.notice is None


def test_gemma3_cannot_render_tool_messages(encoders):
    """Gemma 3 raises on roles that do not alternate user/model: the record cannot be rendered (the
    encoder raises the template's error or a DataError; its caller names the record)."""
    with pytest.raises((DataError, TemplateError)) as caught:
        encoders["gemma3"].encode(TOOL_CALL, tools=[MULTIPLY])
    assert "alternate" in str(caught.value)


# --- markers, everything trained, refusals ---------------------------------------------------------------


def test_template_with_markers_uses_them():
    tok = AutoTokenizer.from_pretrained(REPO / "sft_cluster" / "assets" / "tiny-llama")
    encoder = ChatEncoder(tok, "tiny-llama")
    assert encoder.method == "markers"
    ids, mask = encoder.encode(SYSTEM_MULTI)
    expected = tok.apply_chat_template(
        SYSTEM_MULTI, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(expected["input_ids"]) and mask == list(expected["assistant_masks"])
    assert tok.convert_tokens_to_ids("<|im_end|>") in encoder.end_of_turn_ids


def test_assistant_only_off_trains_every_token(tokenizers):
    encoder = ChatEncoder(tokenizers["llama3_1"], "tiny-llama3_1", assistant_only=False)
    assert encoder.method == "all"
    ids, mask = encoder.encode(SYSTEM_MULTI)
    assert ids == tokenizers["llama3_1"].apply_chat_template(SYSTEM_MULTI, tokenize=True, return_dict=False)
    assert mask == [1] * len(ids)


# No markers, unknown to TRL, and the last assistant turn renders differently from the same turn once
# another message follows: no prefix of the conversation is kept.
NOT_PREFIX_PRESERVING = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and loop.last -%}"
    "{{ '<|im_start|>assistant\\nFinal answer: ' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_template_that_does_not_preserve_prefixes_is_refused(tokenizers):
    tok = build_tokenizer(FAMILIES["qwen2_5"])
    tok.chat_template = NOT_PREFIX_PRESERVING
    with pytest.raises(TemplateRefused) as caught:
        ChatEncoder(tok, "my-org/odd-model").encode(SYSTEM_MULTI)
    message = str(caught.value)
    assert isinstance(caught.value, DataError)
    assert "my-org/odd-model" in message and "model.chat_template" in message
    assert "prefix" in message.lower() or "differently" in message.lower(), message


def test_tokenizer_without_chat_template_is_refused():
    tok = build_tokenizer(FAMILIES["llama3"])
    tok.chat_template = None
    with pytest.raises(TemplateRefused) as caught:
        ChatEncoder(tok, "meta-llama/Meta-Llama-3-8B")
    message = str(caught.value)
    assert "meta-llama/Meta-Llama-3-8B" in message and "model.chat_template" in message
