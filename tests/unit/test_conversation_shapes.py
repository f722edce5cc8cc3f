"""Conversation shapes users bring (tool calls, tool replies, reasoning, tools schemas) read from
files, streamed through real family templates: trained where the template renders them, a
bad record named by file and line where it cannot."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from sft_cluster.data import DataError, build_plan, load_conversations
from sft_cluster.data.chat import ChatEncoder
from sft_cluster.data.stream import RankStream
from sft_cluster.spec import DataSpec, StorageSpec
from tests.fixtures.families import family_models  # noqa: F401 - a fixture

STORE = StorageSpec()
TOOLS = [{"type": "function", "function": {"name": "multiply", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "multiply", "arguments": '{"a": 6, "b": 7}'}}
TOOL_RECORD = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "name": "multiply", "content": "forty-two"},
        {"role": "assistant", "content": "It is 42."},
    ],
}
REASONING_RECORD = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
    ]
}


def _source(tmp_path, *records) -> DataSpec:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return DataSpec.model_validate({"sources": [{"uri": str(path)}], "max_seq_len": 512})


def _samples(data: DataSpec, folder) -> tuple[ChatEncoder, list]:
    encoder = ChatEncoder(AutoTokenizer.from_pretrained(folder), folder.name)
    stream = RankStream(build_plan(data, STORE, 1, 0), 0, data, STORE, encoder)
    return encoder, list(stream.one_pass())


def test_records_keep_tool_calls_tool_replies_reasoning_and_tools(tmp_path):
    conversations = load_conversations(_source(tmp_path, TOOL_RECORD, REASONING_RECORD), STORE)
    tool, reasoning = conversations
    assert tool.tools == TOOLS and reasoning.tools is None
    # OpenAI's JSON-string arguments become the object templates expect.
    assert tool[1]["tool_calls"][0]["function"]["arguments"] == {"a": 6, "b": 7}
    assert tool[2] == {"role": "tool", "name": "multiply", "content": "forty-two"}
    assert reasoning[1]["reasoning_content"] == "Two and two make four."


@pytest.mark.parametrize(
    "record,problem",
    [
        ({"messages": [{"role": "user", "tool_calls": [CALL], "content": "x"}]}, "'tool_calls' must be"),
        ({"messages": [{"role": "assistant", "content": None}]}, "string 'content'"),
        ({"tools": "not json", "messages": TOOL_RECORD["messages"]}, "'tools' is a string but not JSON"),
    ],
)
def test_malformed_shapes_are_named_by_line(tmp_path, record, problem):
    data = _source(tmp_path, REASONING_RECORD, record)
    with pytest.raises(DataError, match=rf"data\.jsonl:2: .*{problem}"):
        load_conversations(data, STORE)


def test_tool_calls_and_answers_train_and_tool_output_does_not(tmp_path, family_models):  # noqa: F811
    encoder, samples = _samples(_source(tmp_path, TOOL_RECORD), family_models["qwen2_5"])
    (sample,) = samples
    tokenizer = encoder.tokenizer
    trained = tokenizer.decode([t for t, m in zip(sample.input_ids, sample.assistant_mask, strict=True) if m])
    untrained = tokenizer.decode(
        [t for t, m in zip(sample.input_ids, sample.assistant_mask, strict=True) if not m]
    )
    assert '"name": "multiply"' in trained and "It is 42." in trained
    assert "forty-two" in untrained and "What is 6 times 7?" in untrained and "forty-two" not in trained


@pytest.mark.parametrize(
    "family,record,what",
    [
        ("llama3", TOOL_RECORD, "tool_calls\\[0\\] name of message 1"),  # Llama 3 drops tool calls
        ("gemma3", TOOL_RECORD, "Conversation roles must alternate"),  # Gemma 3 raises on them
        ("qwen2_5", REASONING_RECORD, "reasoning_content of message 1"),  # Qwen2.5 drops reasoning
    ],
)
def test_a_shape_the_template_cannot_render_is_a_bad_record_named_by_line(
    tmp_path,
    family_models,  # noqa: F811
    family,
    record,
    what,
):
    data = _source(
        tmp_path,
        {"messages": REASONING_RECORD["messages"][:1] + [{"role": "assistant", "content": "ok"}]},
        record,
    )
    with pytest.raises(
        DataError, match=rf"data\.jsonl:2: the chat template cannot render this record: .*{what}"
    ):
        _samples(data, family_models[family])
    skipping = data.model_copy(update={"on_bad_record": "skip"})
    encoder, samples = _samples(skipping, family_models[family])
    assert len(samples) == 1  # the other record trains
