"""Prompt-only examples for prediction and chat, exactly as LLaMA-Factory 0.9.5 `UnsupervisedDatasetProcessor`.

The prompt is every turn up to the last answer, rendered by the template and ending with the
assistant header; the label is the last answer alone (with its closing tokens). Both are truncated
together with `infer_seqlen` to `cutoff_len`, as LF does. Which rows are predicted follows training:
`eval_dataset`, or the `val_size` split of `dataset` (the same rows the eval stage scores).
"""

import logging
from collections.abc import Sequence

import numpy as np

from jaxsft.data import sources
from jaxsft.data.formats import Conversation, Message
from jaxsft.data.args import DataArgs
from jaxsft.data.encode import CHUNK, Counts, encode_each, make_template, rows_at
from jaxsft.data.supervised import infer_seqlen
from jaxsft.errors import ConfigError
from jaxsft.data.templates import Encoder, Template

logger = logging.getLogger(__name__)
Prompt = tuple[np.ndarray, np.ndarray]  # (prompt ids, label ids)


def _strip_thought(template: Template, message: Message) -> Message:
    return Message(message.role, template.remove_thought(message.content))


def encode_oneturn(conversation: Conversation, tokenizer, template: Encoder,
                   preserve_thinking: bool = False) -> tuple[list[int], list[int]]:
    """LF's `Template.encode_oneturn`: (ids of every message but the last, ids of the last)."""
    messages = list(conversation.messages)
    if isinstance(template, Template) and template.kind == "reasoning":  # LF's ReasoningTemplate.encode_oneturn
        if not preserve_thinking:
            messages[:-1] = [_strip_thought(template, m) if i % 2 else m for i, m in enumerate(messages[:-1])]
        if template.enable_thinking is False:
            messages[-1] = _strip_thought(template, messages[-1])
        encoded = template._encode(tokenizer, messages, conversation.system, conversation.tools)
        prompt = [t for ids in encoded[:-1] for t in ids]
        response = encoded[-1]
        open_tag, close_tag = template.thought_words[0].strip(), template.thought_words[1].strip()
        if open_tag not in messages[-1].content and close_tag not in messages[-1].content:
            empty_thought = tokenizer.encode("".join(template.thought_words), add_special_tokens=False)
            if not template.enable_thinking:
                prompt += empty_thought
            else:
                response = empty_thought + response
        return prompt, response
    pairs = template.encode_multiturn(tokenizer, messages, conversation.system, conversation.tools)
    prompt = [t for source, target in pairs[:-1] for t in source + target] + pairs[-1][0]
    return prompt, pairs[-1][1]


def encode_prompt(conversation: Conversation, tokenizer, template: Encoder, cutoff_len: int,
                  preserve_thinking: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, label ids) of one conversation whose last message is the answer to predict.

    For chat, end the conversation with an empty assistant message: the prompt is then what to
    generate from.
    """
    if conversation.plain:
        raise ValueError("a plain-text row (a prompt column and no response) has no answer to predict; predict "
                         "from a dataset with responses")
    prompt, label = encode_oneturn(conversation, tokenizer, template, preserve_thinking)
    if template.efficient_eos:
        label = label + [tokenizer.eos_token_id]
    source_len, target_len = infer_seqlen(len(prompt), len(label), cutoff_len)
    return prompt[:source_len], label[:target_len]


def encode_prompt_rows(rows_of: list[Sequence], attrs: list, refs: Sequence[sources.RowRef], template,
                       tokenizer, args: DataArgs) -> tuple[list[Prompt], Counts]:
    """`encode_prompt` over the referenced rows; invalid rows are dropped (and counted) as training drops them."""
    counts = Counts()
    prompts: list[Prompt] = []

    def encode(conversation, tok):
        return encode_prompt(conversation, tok, template, args.cutoff_len, args.preserve_thinking)

    for _path, _row, (ids, labels) in encode_each(rows_at(rows_of, attrs, refs), args, counts, encode, tokenizer,
                                                  CHUNK):
        prompts.append((np.asarray(ids, np.int32), np.asarray(labels, np.int32)))
        counts.examples += 1
        counts.tokens += len(ids)
        counts.label_tokens += len(labels)
    return prompts, counts


def build_prompts(args: DataArgs, tokenizer) -> tuple[list[Prompt], Counts, Encoder]:
    """The eval rows (`eval_dataset`, or the `val_size` split of `dataset`) as prompt-only examples.

    Fixes the tokenizer in place as `build_datasets` does. Returns (prompts, counts, template).
    """
    template = make_template(args, tokenizer)
    if args.eval_dataset and args.val_size > 1e-6:
        raise ConfigError("Set either val_size or eval_dataset, not both (as in LLaMA-Factory).")
    if args.eval_dataset:
        rows_of, attrs, refs = sources.load_mixed(args.eval_dataset, args)
    elif args.dataset and args.val_size > 1e-6:
        rows_of, attrs, refs = sources.load_mixed(args.dataset, args)
        _, eval_pos = sources.split(len(refs), args.val_size, args.seed)
        refs = [refs[i] for i in eval_pos]
    else:
        raise ConfigError("Prediction needs evaluation data: set eval_dataset, or val_size with dataset.")
    prompts, counts = encode_prompt_rows(rows_of, attrs, refs, template, tokenizer, args)
    if counts.dropped:
        logger.warning("Dropped %d of %d prediction rows. First reasons: %s", counts.dropped, counts.rows,
                       "; ".join(counts.reasons))
    return prompts, counts, template
