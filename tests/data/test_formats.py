"""Rows -> Conversation: LF's drop rules, and malformed rows reported by file, row and field."""

import json

import pytest

from jaxsft.data.args import DataArgs
from jaxsft.data.formats import InvalidExample, to_conversation
from jaxsft.data.pipeline import build_datasets
from jaxsft.data.sources import load_rows, resolve


def _sharegpt(tmp_path, rows, name="chat.json"):
    (tmp_path / name).write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": {
        "file_name": name, "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}}))
    return tmp_path / name


GOOD = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


def test_glaive_tool_calls_become_function_and_observation_turns(data_dir):
    (attr,) = resolve("glaive_toolcall_en_demo", str(data_dir))
    rows = load_rows(attr)
    conv = to_conversation(rows[0], attr, attr.path, 0)
    raw = [t["from"] for t in rows[0]["conversations"]]
    assert raw[:6] == ["human", "gpt", "human", "function_call", "observation", "gpt"]
    assert [m.role for m in conv.messages][:6] == ["user", "assistant", "user", "function", "observation",
                                                   "assistant"]
    assert json.loads(conv.tools)[0]["name"] == "search_recipes"
    assert json.loads(conv.messages[3].content)["name"] == "search_recipes"


def test_malformed_row_error_names_file_row_and_field(tmp_path, new_tokenizer):
    path = _sharegpt(tmp_path, [GOOD, {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}])
    args = DataArgs(dataset="chat", dataset_dir=str(tmp_path), template="qwen", cutoff_len=64,
                    skip_invalid_examples=False)
    with pytest.raises(InvalidExample) as e:
        build_datasets(args, new_tokenizer())
    assert str(e.value) == f"{path}, row 2, field 'conversations[1]': missing key 'value' in {{'from': 'gpt'}}"
    assert (e.value.file, e.value.row, e.value.field) == (str(path), 1, "conversations[1]")


@pytest.mark.parametrize("row, field, reason", [
    ({"conversations": "hi"}, "conversations", "expected a list of turns, got 'hi'"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}, "conversations[0].value",
     "expected a string, got int 3"),
    ({"conversations": ["hi", "there"]}, "conversations[0]", "expected an object, got 'hi'"),
    ({"conversations": GOOD["conversations"], "tools": 7}, "tools", "expected a string, got int 7"),
])
def test_malformed_structures(tmp_path, row, field, reason):
    path = _sharegpt(tmp_path, [row])
    (attr,) = resolve("chat", str(tmp_path))
    with pytest.raises(InvalidExample) as e:
        to_conversation(load_rows(attr)[0], attr, attr.path, 0)
    assert str(e.value) == f"{path}, row 1, field '{field}': {reason}"
    assert e.value.kind == "malformed"


def test_skipped_when_allowed_and_counted_with_reasons(tmp_path, new_tokenizer):
    path = _sharegpt(tmp_path, [GOOD, {"conversations": [{"from": "human"}]}, GOOD])
    args = DataArgs(dataset="chat", dataset_dir=str(tmp_path), template="qwen", cutoff_len=64,
                    skip_invalid_examples=True)
    data = build_datasets(args, new_tokenizer())
    assert data.stats["train_examples"] == 2 and data.stats["train_dropped"] == 1
    assert data.stats["train_dropped_reasons"] == [
        f"{path}, row 2, field 'conversations[0]': missing key 'value' in {{'from': 'human'}}"]


@pytest.mark.parametrize("turns, field, reason", [
    ([("human", "a"), ("human", "b")], "conversations[1].from",
     "role 'human' out of order (expected one of ['gpt', 'function_call'])"),
    ([("human", "a"), ("gpt", "b"), ("human", "c")], "conversations",
     "odd number of turns (3): the last one needs an answer"),
    ([], "conversations", "no turns"),
    ([("gpt", "a"), ("human", "b")], "conversations[0].from",
     "role 'gpt' out of order (expected one of ['human', 'observation'])"),
    ([("system", "s"), ("bot", "a"), ("gpt", "b")], "conversations[1].from",
     "unknown role 'bot' (this dataset's roles: 'human', 'gpt', 'observation', 'function_call', 'system'; set "
     "them in tags of dataset_info.json)"),
])
def test_llamafactory_drops_are_always_dropped(tmp_path, new_tokenizer, turns, field, reason):
    bad = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    path = _sharegpt(tmp_path, [bad, GOOD])
    args = DataArgs(dataset="chat", dataset_dir=str(tmp_path), template="qwen", cutoff_len=64,
                    skip_invalid_examples=False)  # LF drops these with a warning: so do we
    data = build_datasets(args, new_tokenizer())
    assert data.stats["train_examples"] == 1
    assert data.stats["train_dropped_reasons"] == [f"{path}, row 1, field '{field}': {reason}"]


def test_alpaca_rules(tmp_path):
    rows = [{"instruction": "I", "input": "X", "output": "O"}, {"instruction": "I", "input": "", "output": None},
            {"instruction": "", "input": "", "output": ""}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (attr,) = resolve(str(tmp_path / "a.json"), str(tmp_path))
    rows = load_rows(attr)
    conv = to_conversation(rows[0], attr, attr.path, 0)
    assert [(m.role, m.content) for m in conv.messages] == [("user", "I\nX"), ("assistant", "O")]
    with pytest.raises(InvalidExample, match=r"row 2, field 'output': no response \(got None\)") as e:
        to_conversation(rows[1], attr, attr.path, 1)
    assert e.value.kind == "dropped"
    # an empty instruction and answer is still an example for LF
    assert [m.content for m in to_conversation(rows[2], attr, attr.path, 2).messages] == ["", ""]
