"""Rows -> `Conversation(system, tools, messages)`, as LLaMA-Factory 0.9.x `converter.py` does.

Formats: `alpaca` (instruction / input / output / system / history), `sharegpt` (a list of turns with
role and content tags, LF defaults `from` / `value` / `human` / `gpt` / `observation` / `function_call` /
`system`; OpenAI-style `messages` with `role` / `content` / `user` / `assistant` is sharegpt with other
tags), and `openai` (LF's OpenAI converter: `tool_calls`, `tool` turns merged).

Per-message training control (sharegpt and openai, a jaxsft extension): an assistant (or function-call) turn
may carry `"train": false` (its tokens are never learned) or `"weight": w` (its tokens' loss is scaled by
w >= 0); the keys are the `train_tag` / `weight_tag` of `dataset_info.json` `tags`. They become
`Message.weight` (0 for `train: false`, which wins over a weight); see `supervised.encode_weighted`.

Two kinds of bad rows:
- rows LF itself drops with a warning (turns out of order, an odd number of turns, no response, an empty
  conversation): always dropped and counted, reason `kind="dropped"`;
- malformed rows LF would crash on (a field of the wrong type, a turn without its role/content key):
  `InvalidExample(kind="malformed")`, raised when `skip_invalid_examples` is false, else dropped and counted.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Any

from jaxsft.data.registry import DatasetAttr
from jaxsft.errors import InputError

ROLES = ("user", "assistant", "system", "function", "observation")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str
    weight: float = 1.0  # loss weight of an assistant/function turn's tokens (0: not learned)


@dataclass
class Conversation:
    system: str
    tools: str  # JSON text of the tool schemas, or ""
    # user/observation, assistant/function, ...; the last one is the response
    messages: list[Message] = field(default_factory=list)
    plain: bool = False  # plain text (one user message, no template): every token is learned


def row_place(file: str, row: int) -> str:
    """Where a row is, for people: rows count from 1, as lines do (row 1 of a jsonl file is its line 1)."""
    return f"{file}, row {row + 1}"


class InvalidExample(InputError):
    """A row that cannot become a training example; says where and why."""

    def __init__(self, file: str, row: int, field: str, reason: str, kind: str = "malformed"):
        self.file, self.row, self.field, self.reason, self.kind = file, row, field, reason, kind
        super().__init__(f"{row_place(file, row)}, field '{field}': {reason}")

    def __reduce__(self):  # rebuilt from its parts when it crosses a process boundary
        return InvalidExample, (self.file, self.row, self.field, self.reason, self.kind)


def _text(value: Any, where: tuple[str, int], name: str, allow_none: bool = True) -> str:
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise InvalidExample(*where, name, f"expected a string, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _tools(value: Any, where: tuple[str, int], name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):  # LF's openai converter dumps these; accept them for every format
        return json.dumps(value, ensure_ascii=False)
    text = _text(value, where, name)
    _check_json(text, where, name, "tools")
    return text


def _check_json(text: str, where: tuple[str, int], name: str, what: str) -> None:
    """LF's formatters `json.loads` tools and function calls (and crash when they are not JSON)."""
    if not text:
        return
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidExample(*where, name, f"{what} is not valid JSON ({e}): {_short(text)}") from None


def convert_alpaca(row: dict[str, Any], attr: DatasetAttr, file: str, index: int) -> Conversation:
    where = (file, index)
    if attr.is_text:
        text = _text(row.get(attr.prompt), where, attr.prompt)
        if not text:
            raise InvalidExample(*where, attr.prompt, "empty text", "dropped")
        return Conversation("", "", [Message("user", text)], plain=True)
    messages: list[Message] = []
    if attr.history and isinstance(row.get(attr.history), list):
        for k, pair in enumerate(row[attr.history]):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InvalidExample(*where, f"{attr.history}[{k}]", f"expected a [prompt, response] pair, got "
                                                                     f"{_short(pair)}")
            messages.append(Message("user", _text(pair[0], where, f"{attr.history}[{k}][0]", False)))
            messages.append(Message("assistant", _text(pair[1], where, f"{attr.history}[{k}][1]", False)))
    query = []
    for column in (attr.prompt, attr.query):
        if column and row.get(column):
            query.append(_text(row[column], where, column))
    messages.append(Message("user", "\n".join(query)))
    response = row.get(attr.response) if attr.response else None
    if not isinstance(response, str):
        raise InvalidExample(*where, attr.response or "output", f"no response (got {_short(response)})", "dropped")
    messages.append(Message("assistant", response))
    system = _text(row.get(attr.system), where, attr.system) if attr.system else ""
    tools = _tools(row.get(attr.tools), where, attr.tools) if attr.tools else ""
    return Conversation(system, tools, messages)


def _turns(row: dict[str, Any], attr: DatasetAttr, where: tuple[str, int]) -> list[dict[str, Any]]:
    turns = row.get(attr.messages)
    if not isinstance(turns, list):
        raise InvalidExample(*where, attr.messages, f"expected a list of turns, got {_short(turns)}")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidExample(*where, f"{attr.messages}[{k}]", f"expected an object, got {_short(turn)}")
        for key in (attr.role_tag, attr.content_tag):
            if key not in turn:
                raise InvalidExample(*where, f"{attr.messages}[{k}]", f"missing key '{key}' in {_short(turn)}")
    return turns


def convert_sharegpt(row: dict[str, Any], attr: DatasetAttr, file: str, index: int) -> Conversation:
    where = (file, index)
    turns = _turns(row, attr, where)
    tag_to_role = {attr.user_tag: "user", attr.assistant_tag: "assistant", attr.observation_tag: "observation",
                   attr.function_tag: "function", attr.system_tag: "system"}
    odd, even = (attr.user_tag, attr.observation_tag), (attr.assistant_tag, attr.function_tag)
    if attr.system_tag and turns and turns[0][attr.role_tag] == attr.system_tag:
        system = _text(turns[0][attr.content_tag], where, f"{attr.messages}[0].{attr.content_tag}")
        turns, first = turns[1:], 1
    else:
        system = _text(row.get(attr.system), where, attr.system) if attr.system else ""
        first = 0
    messages = []
    for k, turn in enumerate(turns):
        tag = turn[attr.role_tag]
        if tag not in tag_to_role or tag is None:
            known = ", ".join(repr(t) for t in tag_to_role if t is not None)
            raise InvalidExample(*where, f"{attr.messages}[{k + first}].{attr.role_tag}",
                                 f"unknown role {tag!r} (this dataset's roles: {known}; set them in tags of "
                                 f"dataset_info.json)", "dropped")
        if tag not in (odd, even)[k % 2]:
            raise InvalidExample(*where, f"{attr.messages}[{k + first}].{attr.role_tag}",
                                 f"role {tag!r} out of order (expected one of {list((odd, even)[k % 2])})", "dropped")
        content = _text(turn[attr.content_tag], where, f"{attr.messages}[{k + first}].{attr.content_tag}", False)
        if tag == attr.function_tag:
            _check_json(content, where, f"{attr.messages}[{k + first}].{attr.content_tag}", "a function call")
        weight = _weight(turn, attr, where, f"{attr.messages}[{k + first}]", tag_to_role[tag])
        messages.append(Message(tag_to_role[tag], content, weight))
    _check_count(messages, attr, where)
    tools = _tools(row.get(attr.tools), where, attr.tools) if attr.tools else ""
    return Conversation(system, tools, messages)


def _weight(turn: dict[str, Any], attr: DatasetAttr, where: tuple[str, int], name: str, role: str) -> float:
    """The loss weight a turn's `train_tag` / `weight_tag` keys give it (1 without them; `train: false` -> 0,
    winning over a weight). Only answers (assistant / function-call turns) may carry them; a key that is null
    (a column other rows fill) counts as absent."""
    weight = 1.0
    for tag in (attr.train_tag, attr.weight_tag):
        if not tag or turn.get(tag) is None:
            continue
        value, field_name = turn[tag], f"{name}.{tag}"
        if role not in ("assistant", "function"):
            raise InvalidExample(*where, field_name, f"only assistant turns can carry {tag!r} (this turn's role is "
                                                     f"{role!r}); remove it from this turn")
        if tag == attr.train_tag:
            if not isinstance(value, bool):
                raise InvalidExample(*where, field_name, f"expected true or false, got {_short(value)}")
            weight = weight if value else 0.0
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise InvalidExample(*where, field_name, f"expected a number >= 0, got {_short(value)}")
            weight = float(value) if weight else 0.0
    return weight


def _check_count(messages: list[Message], attr: DatasetAttr, where: tuple[str, int]) -> None:
    if len(messages) % 2 != 0:
        raise InvalidExample(*where, attr.messages, f"odd number of turns ({len(messages)}): the last one needs "
                                                    "an answer", "dropped")
    if not messages:
        raise InvalidExample(*where, attr.messages, "no turns", "dropped")


def convert_openai(row: dict[str, Any], attr: DatasetAttr, file: str, index: int) -> Conversation:
    """LF's OpenAIDatasetConverter, including its `detailed thinking off` system-prompt suffix."""
    where = (file, index)
    turns = _turns(row, attr, where)
    tag_to_role = {attr.user_tag: "user", attr.assistant_tag: "assistant", attr.observation_tag: "observation",
                   attr.function_tag: "function", attr.system_tag: "system"}
    if attr.system_tag and turns and turns[0][attr.role_tag] == attr.system_tag:
        system = _text(turns[0][attr.content_tag], where, f"{attr.messages}[0].{attr.content_tag}")
        turns = turns[1:]
    else:
        system = _text(row.get(attr.system), where, attr.system) if attr.system else ""
    messages: list[Message] = []
    tool_responses: list[str] = []
    skipped = len(row[attr.messages]) - len(turns)  # a leading system turn
    for k, turn in enumerate(turns):
        tag, content = turn[attr.role_tag], turn[attr.content_tag]
        if tag in (attr.assistant_tag, attr.function_tag) and turn.get("tool_calls"):
            calls = turn["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and "function" in c for c in calls):
                raise InvalidExample(*where, f"{attr.messages}[{k}].tool_calls",
                                     f"expected a list of {{'function': ...}} objects, got {_short(calls)}")
            content = json.dumps([call["function"] for call in calls], ensure_ascii=False)
            tag = attr.function_tag
        if tag == attr.observation_tag:
            _weight(turn, attr, where, f"{attr.messages}[{k + skipped}]", "observation")
            tool_responses.append(_text(content, where, f"{attr.messages}[{k}].{attr.content_tag}"))
            continue
        if tool_responses:
            messages.append(Message("observation", "\n</tool_response>\n<tool_response>\n".join(tool_responses)))
            tool_responses = []
        if tag not in tag_to_role:
            raise InvalidExample(*where, f"{attr.messages}[{k}].{attr.role_tag}", f"unknown role {tag!r}", "dropped")
        weight = _weight(turn, attr, where, f"{attr.messages}[{k + skipped}]", tag_to_role[tag])
        messages.append(Message(tag_to_role[tag], _text(content, where, f"{attr.messages}[{k}].{attr.content_tag}"),
                                weight))
    for k, message in enumerate(messages):
        allowed = (("user", "observation"), ("assistant", "function"))[k % 2]
        if message.role not in allowed:
            raise InvalidExample(*where, attr.messages, f"turn {k} has role {message.role!r} out of order",
                                 "dropped")
    _check_count(messages, attr, where)
    tools = _tools(row.get(attr.tools), where, attr.tools) if attr.tools else ""
    short = "detailed thinking off"
    if not system:
        system = "" if tools else short
    elif not tools:
        system = system if ("detailed thinking on" in system or short in system) else system + "\n" + short
    else:
        system += "\n"
    return Conversation(system, tools, messages)


CONVERTERS = {"alpaca": convert_alpaca, "sharegpt": convert_sharegpt, "openai": convert_openai}


def to_conversation(row: Any, attr: DatasetAttr, file: str, index: int) -> Conversation:
    """One row -> a Conversation; raises InvalidExample (see the module docstring for the two kinds)."""
    if not isinstance(row, dict):
        raise InvalidExample(file, index, "<row>", f"expected a JSON object, got {_short(row)}")
    return CONVERTERS[attr.formatting](row, attr, file, index)
