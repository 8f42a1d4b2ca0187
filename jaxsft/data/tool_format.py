"""Tool descriptions and function calls rendered as text, as LLaMA-Factory 0.9.x `tool_utils.py` does.

Formats: `default` (ReAct style "Action: / Action Input:"), `llama3`, `qwen`, `mistral`.
"""

import json
import re
from datetime import datetime
from typing import Any, NamedTuple


class FunctionCall(NamedTuple):
    name: str
    arguments: str  # JSON text


DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)

LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    """Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. """
    "Do not use variables.\n\n{tool_text}"
)

QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)


def today() -> str:
    """The date llama3's tool prompt shows (LLaMA-Factory uses the current day). Tests pin it."""
    return datetime.now().strftime("%d %b %Y")


def _default_tools(tools: list[dict[str, Any]]) -> str:
    tool_text, tool_names = "", []
    for tool in tools:
        tool = tool.get("function", "") if tool.get("type") == "function" else tool
        param_text = ""
        for name, param in tool["parameters"]["properties"].items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum", None) else ""
            items = (
                ", where each item should be {}".format(param["items"].get("type", ""))
                if param.get("items", None) else ""
            )
            param_text += "  - {name} ({type}{required}): {desc}{enum}{items}\n".format(
                name=name, type=param.get("type", ""), required=required, desc=param.get("description", ""),
                enum=enum, items=items,
            )
        tool_text += "> Tool Name: {name}\nTool Description: {desc}\nTool Args:\n{args}\n".format(
            name=tool["name"], desc=tool.get("description", ""), args=param_text
        )
        tool_names.append(tool["name"])
    return DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(tool_names))


def _default_calls(functions: list[FunctionCall]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in functions)


def _wrap(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _llama3_tools(tools: list[dict[str, Any]]) -> str:
    tool_text = "".join(json.dumps(_wrap(t), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    return LLAMA3_TOOL_PROMPT.format(date=today(), tool_text=tool_text)


def _llama3_calls(functions: list[FunctionCall]) -> str:
    objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in functions]
    return json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False)


def _qwen_tools(tools: list[dict[str, Any]]) -> str:
    tool_text = "".join("\n" + json.dumps(_wrap(t), ensure_ascii=False) for t in tools)
    return QWEN_TOOL_PROMPT.format(tool_text=tool_text)


def _qwen_calls(functions: list[FunctionCall]) -> str:
    texts = [json.dumps({"name": n, "arguments": json.loads(a)}, ensure_ascii=False) for n, a in functions]
    return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)


def _mistral_tools(tools: list[dict[str, Any]]) -> str:
    return "[AVAILABLE_TOOLS] " + json.dumps([_wrap(t) for t in tools], ensure_ascii=False) + "[/AVAILABLE_TOOLS]"


def _mistral_calls(functions: list[FunctionCall]) -> str:
    return json.dumps([{"name": n, "arguments": json.loads(a)} for n, a in functions], ensure_ascii=False)


TOOL_FORMATS = {
    "default": (_default_tools, _default_calls),
    "llama3": (_llama3_tools, _llama3_calls),
    "qwen": (_qwen_tools, _qwen_calls),
    "mistral": (_mistral_tools, _mistral_calls),
}


def format_tools(tools_json: str, tool_format: str) -> str:
    """The system-prompt text describing `tools_json` (a JSON list of tool schemas)."""
    try:
        tools = json.loads(tools_json)
    except json.JSONDecodeError as e:
        raise ValueError(f"tools is not valid JSON ({e}): {tools_json[:200]!r}") from None
    return TOOL_FORMATS[tool_format][0](tools) if len(tools) != 0 else ""


def _parse_calls(json_content: str, original: str) -> list[FunctionCall]:
    try:
        calls = json.loads(json_content)
    except json.JSONDecodeError:
        raise ValueError(f"function_call turn is not valid JSON: {original[:200]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    try:
        return [FunctionCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
    except (KeyError, TypeError):
        raise ValueError(f"function_call turn needs 'name' and 'arguments': {original[:200]!r}") from None


def format_function_call(
    content: str, tool_format: str, thought_words: tuple[str, str] | None = None,
    tool_call_words: tuple[str, str] | None = None,
) -> str:
    """The assistant text for a function_call turn (LLaMA-Factory's `FunctionFormatter`)."""
    render = TOOL_FORMATS[tool_format][1]
    tool_call_match = None
    if tool_call_words and len(tool_call_words) == 2:
        regex = re.compile(rf"{re.escape(tool_call_words[0])}(.*?){re.escape(tool_call_words[1])}", re.DOTALL)
        tool_call_match = re.search(regex, content)
    if tool_call_match is not None:
        thought = content.replace(tool_call_match.group(0), "")
        return thought + render(_parse_calls(tool_call_match.group(1), content))
    thought_match = None
    if thought_words and len(thought_words) == 2:
        regex = re.compile(rf"{re.escape(thought_words[0])}(.*?){re.escape(thought_words[1])}", re.DOTALL)
        thought_match = re.search(regex, content)
    json_part = content.replace(thought_match.group(0), "") if thought_match else content
    text = render(_parse_calls(json_part, content))
    return thought_match.group(0) + text if thought_match else text
