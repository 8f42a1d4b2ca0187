"""Chat templates: a conversation -> (prompt ids, response ids) per turn, as LLaMA-Factory 0.9.5 renders it.

A template is a set of slot lists. A slot is a string (`{{content}}` is replaced by the text, then
tokenized without special tokens), `{"bos_token"}` / `{"eos_token"}` (the tokenizer's id), or
`{"token": "<x>"}` (one token by name). Each string slot is tokenized on its own, exactly as LF does,
so ids match LF token for token.

`template: auto` uses the tokenizer's own jinja `chat_template` instead (see `ChatTemplate`).
"""

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from jaxsft.data.formats import Message
from jaxsft.data.tool_format import TOOL_FORMATS, format_function_call, format_tools
from jaxsft.errors import ConfigError

logger = logging.getLogger(__name__)

Slot = str | set | dict
EOS: set = {"eos_token"}
BOS: set = {"bos_token"}


class Encoder(Protocol):
    efficient_eos: bool

    def encode_multiturn(self, tokenizer, messages: list[Message], system: str, tools: str,
                         discarding_history_cot: bool = False) -> list[tuple[list[int], list[int]]]: ...


def _apply(slots: tuple[Slot, ...], **kwargs: str) -> list[Slot]:
    """LF's StringFormatter.apply: replace `{{name}}` once per string slot, in kwargs order."""
    out = []
    for slot in slots:
        if isinstance(slot, str):
            for name, value in kwargs.items():
                slot = slot.replace("{{" + name + "}}", value, 1)
        out.append(slot)
    return out


@dataclass(frozen=True)
class Template:
    name: str
    user: tuple[Slot, ...] = ("{{content}}",)
    assistant: tuple[Slot, ...] = ("{{content}}", EOS)
    system: tuple[Slot, ...] = ("{{content}}",)
    function: tuple[Slot, ...] | None = None  # None: same as assistant
    observation: tuple[Slot, ...] | None = None  # None: same as user
    prefix: tuple[Slot, ...] = ()
    tool_format: str = "default"  # for the tools prompt
    function_format: str = "default"  # for function_call turns
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")
    efficient_eos: bool = False
    replace_eos: bool = False
    kind: str = "default"  # "default" | "llama2" (system fused into the first user turn) | "reasoning"
    enable_thinking: bool | None = True

    # -- slots -> ids -----------------------------------------------------------------------------
    @staticmethod
    def _to_ids(tokenizer, elements: list[Slot]) -> list[int]:
        ids: list[int] = []
        for elem in elements:
            if isinstance(elem, str):
                if elem:
                    ids += tokenizer.encode(elem, add_special_tokens=False)
            elif isinstance(elem, dict):
                ids.append(tokenizer.convert_tokens_to_ids(elem.get("token")))
            elif isinstance(elem, set):
                if "bos_token" in elem and tokenizer.bos_token_id is not None:
                    ids.append(tokenizer.bos_token_id)
                elif "eos_token" in elem and tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
        return ids

    def _turn(self, message: Message, i: int, system_text: str = "") -> list[Slot]:
        role, content = message.role, message.content
        if role == "user":
            if self.kind == "llama2":
                return _apply(self.user, content=system_text + content)
            return _apply(self.user, content=content, idx=str(i // 2))
        if role == "assistant":
            return _apply(self.assistant, content=content)
        if role == "observation":
            return _apply(self.observation or self.user, content=content)
        if role == "function":
            if self.kind == "llama2":  # LF's Llama2Template passes no thought/tool-call words
                text = format_function_call(content, self.function_format)
            else:
                text = format_function_call(content, self.function_format, self.thought_words, self.tool_call_words)
            return _apply(self.function or self.assistant, content=text)
        raise ValueError(f"unexpected role {role!r}")

    def _encode(self, tokenizer, messages: list[Message], system: str, tools: str) -> list[list[int]]:
        """Token ids of each message; prefix and system go with the first one."""
        system = system or self.default_system
        encoded = []
        for i, message in enumerate(messages):
            elements: list[Slot] = []
            system_text = ""
            if i == 0:
                elements += list(self.prefix)
                if system or tools:
                    tool_text = format_tools(tools, self.tool_format) if tools else ""
                    system_slots = _apply(self.system, content=system + tool_text)
                    if self.kind == "llama2":
                        system_text = system_slots[0]
                    else:
                        elements += system_slots
            elements += self._turn(message, i, system_text)
            encoded.append(self._to_ids(tokenizer, elements))
        return encoded

    # -- thinking (LF's ReasoningTemplate) --------------------------------------------------------
    def remove_thought(self, content: str) -> str:
        pattern = re.compile(f"{re.escape(self.thought_words[0])}(.*?){re.escape(self.thought_words[1])}", re.DOTALL)
        return re.sub(pattern, "", content).lstrip("\n")

    def encode_multiturn(
        self, tokenizer, messages: list[Message], system: str = "", tools: str = "",
        discarding_history_cot: bool = False,
    ) -> list[tuple[list[int], list[int]]]:
        """[(prompt ids, response ids)] for each user/assistant pair.

        Reasoning templates (LF's ReasoningTemplate): with `enable_thinking: false` every thought is removed
        and an empty `<think>\\n\\n</think>\\n\\n` goes into the prompt (not learned); otherwise an answer
        without a thought gets the empty one in its response (learned). `discarding_history_cot` (LF 0.9.5:
        `mask_history` without `preserve_thinking`) strips thoughts from earlier answers and only the last
        one gets an empty thought.
        """
        if self.kind == "reasoning":
            messages = list(messages)
            if self.enable_thinking is False:
                for i in range(1, len(messages), 2):
                    messages[i] = Message(messages[i].role, self.remove_thought(messages[i].content))
            if discarding_history_cot:
                for i in range(1, len(messages) - 2, 2):
                    messages[i] = Message(messages[i].role, self.remove_thought(messages[i].content))
        encoded = self._encode(tokenizer, messages, system, tools)
        if self.kind == "reasoning":
            empty_thought = tokenizer.encode("".join(self.thought_words), add_special_tokens=False)
            open_tag, close_tag = self.thought_words[0].strip(), self.thought_words[1].strip()
            turns = [len(messages) - 2] if discarding_history_cot else range(0, len(messages), 2)
            for i in turns:
                content = messages[i + 1].content
                if open_tag not in content and close_tag not in content:
                    if not self.enable_thinking:
                        encoded[i] = encoded[i] + empty_thought
                    else:
                        encoded[i + 1] = empty_thought + encoded[i + 1]
        return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]


def _chatml_like(name: str, **kw) -> Template:
    return Template(
        name=name,
        user=("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        assistant=("{{content}}<|im_end|>\n",),
        system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
        **kw,
    )


_QWEN_TOOLS = dict(
    function=("{{content}}<|im_end|>\n",),
    observation=("<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n"
                 "<|im_start|>assistant\n",),
    tool_format="qwen", function_format="qwen", stop_words=("<|im_end|>",), replace_eos=True,
)

TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template(
        "default", user=("Human: {{content}}", EOS, "\nAssistant:"), assistant=("{{content}}", EOS, "\n"),
        system=("System: {{content}}", EOS, "\n"),
    ),
    Template("empty", assistant=("{{content}}",)),
    Template(
        "alpaca", user=("### Instruction:\n{{content}}\n\n### Response:\n",), assistant=("{{content}}", EOS, "\n\n"),
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n"
        ),
    ),
    Template(
        "vicuna", user=("USER: {{content}} ASSISTANT:",),
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
    ),
    Template(
        "zephyr", user=("<|user|>\n{{content}}", EOS, "<|assistant|>\n"), system=("<|system|>\n{{content}}", EOS),
        default_system="You are Zephyr, a helpful assistant.",
    ),
    _chatml_like(
        "chatml", observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True,
    ),
    Template(
        "llama2", user=(BOS, "[INST] {{content}} [/INST]"), system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
        kind="llama2",
    ),
    Template(
        "llama3",
        user=("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",),
        assistant=("{{content}}<|eot_id|>",),
        system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
        function=("{{content}}<|eot_id|>",),
        observation=("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n",),
        prefix=(BOS,), tool_format="llama3", function_format="llama3", stop_words=("<|eot_id|>", "<|eom_id|>"),
        replace_eos=True,
    ),
    Template(
        "mistral", user=("[INST] {{content}}[/INST]",), assistant=(" {{content}}", EOS), system=("{{content}}\n\n",),
        function=("[TOOL_CALLS] {{content}}", EOS),
        observation=("""[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]""",),
        prefix=(BOS,), tool_format="mistral", function_format="mistral", kind="llama2",
    ),
    _chatml_like("qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                 **_QWEN_TOOLS),
    _chatml_like("qwen3", kind="reasoning", **_QWEN_TOOLS),
    _chatml_like("qwen3_nothink", **_QWEN_TOOLS),
    Template(
        "gemma", user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        assistant=("{{content}}<end_of_turn>\n",), system=("{{content}}\n\n",),
        observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        prefix=(BOS,), stop_words=("<end_of_turn>",), replace_eos=True, kind="llama2",
    ),
    # gemma3's text part is gemma's (LF adds an image plugin, not used for text)
    Template(
        "gemma3", user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        assistant=("{{content}}<end_of_turn>\n",), system=("{{content}}\n\n",),
        observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        prefix=(BOS,), stop_words=("<end_of_turn>",), replace_eos=True, kind="llama2",
    ),
    # gemma2: gemma's turns, but the tokenizer's EOS closes each answer (efficient_eos) instead of a new EOS
    Template(
        "gemma2", user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        assistant=("{{content}}<end_of_turn>\n",), system=("{{content}}\n\n",),
        observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
        prefix=(BOS,), stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True, kind="llama2",
    ),
    Template(
        "phi", user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",), assistant=("{{content}}<|end|>\n",),
        system=("<|system|>\n{{content}}<|end|>\n",), stop_words=("<|end|>",), replace_eos=True,
    ),
    Template(
        "phi4", user=("<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",),
        assistant=("{{content}}<|im_end|>",), system=("<|im_start|>system<|im_sep|>{{content}}<|im_end|>",),
        stop_words=("<|im_end|>",), replace_eos=True,
    ),
    Template("deepseek3", user=("<｜User｜>{{content}}<｜Assistant｜>",), prefix=(BOS,)),
    # efficient_eos: the EOS closing each answer is learned as the first label of the next prompt
    Template("breeze", user=("[INST] {{content}} [/INST] ",), assistant=("{{content}}",), prefix=(BOS,),
             efficient_eos=True),
]}


def _fix_special_tokens(template: Template, tokenizer) -> None:
    """LF's `fix_special_tokens`: EOS <- first stop word (replace_eos), pad <- EOS, stop words special."""
    stop_words = list(template.stop_words)
    if template.replace_eos:
        if tokenizer.eos_token != stop_words[0]:
            added = tokenizer.add_special_tokens({"eos_token": stop_words[0]})
            logger.info("Template %s sets the EOS token to %s.", template.name, stop_words[0])
            if added:
                logger.warning("New tokens were added to the tokenizer; the model's vocab must be resized.")
        stop_words = stop_words[1:]
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if stop_words:
        try:
            added = tokenizer.add_special_tokens(
                dict(additional_special_tokens=stop_words), replace_additional_special_tokens=False
            )
        except TypeError:
            added = tokenizer.add_special_tokens(dict(additional_special_tokens=stop_words))
        if added:
            logger.warning("New tokens were added to the tokenizer; the model's vocab must be resized.")


def get_template(
    name: str, tokenizer, *, default_system: str | None = None, enable_thinking: bool | None = True,
    train_on_prompt: bool = False, tool_format: str | None = None,
) -> Encoder:
    """The named template (or `auto`: the tokenizer's chat_template); fixes the tokenizer's EOS/pad as LF does.

    The tokenizer is modified in place (EOS replaced for templates with `replace_eos`, pad set when missing,
    stop words registered as special tokens), exactly like LLaMA-Factory's `get_template_and_fix_tokenizer`.
    """
    if name == "auto":
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            raise ConfigError("template: auto needs a tokenizer with a chat_template; this tokenizer has none. "
                             f"Pick a named template: {', '.join(sorted(TEMPLATES))}.")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return ChatTemplate(default_system=default_system)
    if name not in TEMPLATES:
        raise ConfigError(f"Unknown template {name!r}. Known templates: auto, {', '.join(sorted(TEMPLATES))}.")
    template = TEMPLATES[name]
    if train_on_prompt and template.efficient_eos:
        raise ConfigError(f"Template {name!r} uses efficient_eos and does not support train_on_prompt.")
    if tool_format is not None:  # LF: plain function slots and this format for tools and calls
        if tool_format not in TOOL_FORMATS:
            raise ConfigError(f"Unknown tool_format {tool_format!r}. Known: {', '.join(sorted(TOOL_FORMATS))}.")
        slots = ("{{content}}",) if template.efficient_eos else ("{{content}}", EOS)
        template = dataclasses.replace(template, function=slots, function_format=tool_format, tool_format=tool_format)
    if default_system is not None:
        template = dataclasses.replace(template, default_system=default_system)
    if template.kind == "reasoning":
        template = dataclasses.replace(template, enable_thinking=enable_thinking)
    _fix_special_tokens(template, tokenizer)
    return template


def _hf_message(message: Message) -> dict[str, Any]:
    if message.role == "function":
        calls = json.loads(message.content)
        calls = calls if isinstance(calls, list) else [calls]
        tool_calls = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                      for c in calls]
        return {"role": "assistant", "content": "", "tool_calls": tool_calls}
    if message.role == "observation":
        return {"role": "tool", "content": message.content}
    return {"role": message.role, "content": message.content}


@dataclass(frozen=True)
class ChatTemplate:
    """`template: auto`: render with the tokenizer's own jinja chat_template.

    Growing prefixes of the conversation are rendered (prompts with `add_generation_prompt=True`); the text
    each step adds is that turn's prompt or response. Each piece is tokenized on its own. When a template
    rewrites earlier turns (so a prefix's rendering is not a prefix of the whole), the boundary falls at the
    longest common prefix, and a warning is logged once.
    """

    default_system: str | None = None
    efficient_eos: bool = False

    def encode_multiturn(self, tokenizer, messages: list[Message], system: str = "", tools: str = "",
                         discarding_history_cot: bool = False) -> list[tuple[list[int], list[int]]]:
        hf = [_hf_message(m) for m in messages]
        system = system or self.default_system
        if system:
            hf = [{"role": "system", "content": system}] + hf
        offset = 1 if system else 0
        kwargs: dict[str, Any] = {"tokenize": False}
        if tools:
            kwargs["tools"] = json.loads(tools)

        def render(n: int, gen: bool) -> str:
            if n == 0:
                return ""
            return tokenizer.apply_chat_template(hf[:n], add_generation_prompt=gen, **kwargs)

        full = render(len(hf), False)
        cuts = [0]
        for i in range(len(messages)):  # end of message i: prompts end with the generation prompt
            text = render(offset + i + 1, i % 2 == 0)
            cut = len(text)
            if not full.startswith(text):
                cut = len(_common_prefix(full, text))
                if not _WARNED:
                    _WARNED.append(True)
                    logger.warning("The chat template rewrites earlier turns; turn boundaries use common prefixes.")
            cuts.append(max(cut, cuts[-1]))
        cuts[-1] = len(full)
        pieces = [tokenizer.encode(full[a:b], add_special_tokens=False) if b > a else []
                  for a, b in zip(cuts[:-1], cuts[1:])]
        return [(pieces[i], pieces[i + 1]) for i in range(0, len(pieces), 2)]



_WARNED: list[bool] = []


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
