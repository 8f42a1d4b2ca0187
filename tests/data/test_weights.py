"""Per-message training control: `train: false` / `weight: w` on answers become labels and per-token loss
weights that survive the batched tokenizer, the cache, tokenized_path, packing and streaming."""

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxsft.data.args import DataArgs
from jaxsft.data.encode import Counts, encode_list, make_template, supervised_examples
from jaxsft.data.formats import InvalidExample, to_conversation
from jaxsft.data.packing import IGNORE_INDEX, eval_batches, make_row, weights_of
from jaxsft.data.pipeline import build_datasets
from jaxsft.data.sources import load_rows, resolve

TURNS = [("hi there", "hello! how can I help?"), ("what is two plus two?", "four, of course."),
         ("and three plus three?", "six.")]


def _chat(marks, openai=False):
    """A conversation of TURNS; marks[k] is the extra keys of answer k."""
    role, content, user, assistant = ("role", "content", "user", "assistant") if openai else \
        ("from", "value", "human", "gpt")
    turns = []
    for k, (q, a) in enumerate(TURNS):
        turns.append({role: user, content: q})
        turns.append({role: assistant, content: a, **marks.get(k, {})})
    return {"messages" if openai else "conversations": turns}


def _dataset(tmp_path, rows, formatting="sharegpt", tags=None):
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    entry = {"file_name": "chat.json", "formatting": formatting}
    if formatting == "openai":
        entry.update(columns={"messages": "messages"},
                     tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant", "system_tag": "system", "observation_tag": "tool",
                           "function_tag": "function_call", **(tags or {})})
    elif tags:
        entry["tags"] = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                         **tags}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": entry}))
    return tmp_path / "chat.json"


def _encode(tmp_path, tokenizer, rows, template="qwen", chunk=1, **options):
    args = DataArgs(dataset="chat", dataset_dir=str(tmp_path), template=template, cutoff_len=512, **options)
    (attr,) = resolve("chat", str(tmp_path))
    tmpl = make_template(args, tokenizer)
    rows_ = [(attr, i, row) for i, row in enumerate(load_rows(attr))]
    counts = Counts()
    return list(supervised_examples(rows_, tmpl, tokenizer, args, counts, chunk)), counts, tmpl, attr


def _spans(template, tokenizer, conversation):
    """[(start, end)] of each answer's tokens in the encoded example (the rendered pairs, back to back)."""
    pairs = template.encode_multiturn(tokenizer, conversation.messages, conversation.system, conversation.tools)
    spans, at = [], 0
    for source, target in pairs:
        at += len(source)
        spans.append((at, at + len(target)))
        at += len(target)
    return spans


@pytest.mark.parametrize("openai", [False, True])
def test_train_false_and_weight_give_the_expected_labels_and_weights(tmp_path, tokenizer, openai):
    marks = {0: {"train": False}, 1: {"weight": 0.5}}
    rows = [_chat(marks, openai), _chat({}, openai)]
    _dataset(tmp_path, rows, "openai" if openai else "sharegpt")
    (marked, plain), _, template, attr = _encode(tmp_path, tokenizer, rows)
    np.testing.assert_array_equal(marked[0], plain[0])  # the same tokens; only what is learned differs
    assert weights_of(plain) is not None and getattr(plain, "weights", None) is None  # 1 on labels, stored none
    conversation = to_conversation(load_rows(attr)[0], attr, attr.path, 0)
    spans = _spans(template, tokenizer, conversation)
    ids, labels, weights = marked[0], marked[1], marked.weights
    learned = labels != IGNORE_INDEX
    for k, (a, b) in enumerate(spans):
        # the span is the rendered answer: its text and the template's end of turn
        assert tokenizer.decode(ids[a:b]) == TURNS[k][1] + "<|im_end|>\n"
        np.testing.assert_array_equal(plain[1][a:b], ids[a:b])  # unmarked: learned
    (a0, b0), (a1, b1), (a2, b2) = spans
    assert not learned[a0:b0].any() and (weights[a0:b0] == 0).all()  # train: false
    np.testing.assert_array_equal(labels[a1:b1], ids[a1:b1])
    assert (weights[a1:b1] == 0.5).all()  # weight 0.5
    assert (weights[a2:b2] == 1.0).all() and learned[a2:b2].all()  # unmarked answer
    assert np.flatnonzero(learned).tolist() == list(range(a1, b1)) + list(range(a2, b2))  # nothing else
    np.testing.assert_array_equal(weights, np.where(learned, weights, 0.0))


def test_openai_tool_call_answers_carry_weights(tmp_path, tokenizer):
    row = {"messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "weight": 3,
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "21 degrees.", "train": False}],
        "tools": [{"name": "weather", "parameters": {"type": "object"}}]}
    _dataset(tmp_path, [row], "openai")
    (example,), _, template, attr = _encode(tmp_path, tokenizer, [row])
    conversation = to_conversation(load_rows(attr)[0], attr, attr.path, 0)
    assert [(m.role, m.weight) for m in conversation.messages] == [("user", 1.0), ("function", 3.0),
                                                                    ("observation", 1.0), ("assistant", 0.0)]
    (a0, b0), (a1, b1) = _spans(template, tokenizer, conversation)
    learned = example[1] != IGNORE_INDEX
    assert np.flatnonzero(learned).tolist() == list(range(a0, b0))  # only the tool call
    assert (example.weights[a0:b0] == 3.0).all() and '"name": "weather"' in tokenizer.decode(example[0][a0:b0])


def test_custom_tags_and_null_marks(tmp_path, tokenizer):
    rows = [_chat({0: {"learn": False, "w": None}, 1: {"w": 2}})]
    _dataset(tmp_path, rows, tags={"train_tag": "learn", "weight_tag": "w"})
    (example,), _, _, _ = _encode(tmp_path, tokenizer, rows)
    assert sorted(set(example.weights.tolist())) == [0.0, 1.0, 2.0]
    # the default keys are plain data under other tags: not read
    rows = [_chat({0: {"train": False, "weight": 5}})]
    _dataset(tmp_path, rows, tags={"train_tag": "learn", "weight_tag": "w"})
    (example,), _, _, _ = _encode(tmp_path, tokenizer, rows)
    assert getattr(example, "weights", None) is None


def test_a_registry_tag_typo_is_refused(tmp_path, tokenizer):
    _dataset(tmp_path, [_chat({})], tags={"weigth_tag": "w"})
    from jaxsft.errors import InputError
    with pytest.raises(InputError, match="unknown key 'weigth_tag', did you mean 'weight_tag'"):
        resolve("chat", str(tmp_path))


@pytest.mark.parametrize("turn, key, reason", [
    (1, {"weight": -1}, "weight': expected a number >= 0, got -1"),
    (1, {"weight": "2"}, "weight': expected a number >= 0, got '2'"),
    (1, {"weight": True}, "weight': expected a number >= 0, got True"),
    (1, {"weight": float("nan")}, "weight': expected a number >= 0, got nan"),
    (1, {"train": "no"}, "train': expected true or false, got 'no'"),
    (2, {"weight": 2}, "weight': only assistant turns can carry 'weight' (this turn's role is 'user'); remove it "
                       "from this turn"),
])
@pytest.mark.parametrize("openai", [False, True])
def test_bad_marks_name_file_row_message_and_key(tmp_path, tokenizer, turn, key, reason, openai):
    row = _chat({}, openai)
    turns = row["messages" if openai else "conversations"]
    turns[turn].update(key)
    path = _dataset(tmp_path, [_chat({}, openai), row], "openai" if openai else "sharegpt")
    with pytest.raises(InvalidExample) as e:
        _encode(tmp_path, tokenizer, None)
    column = "messages" if openai else "conversations"
    assert str(e.value).startswith(f"{path}, row 2, field '{column}[{turn}].")
    assert str(e.value).endswith(reason)
    assert "\n" not in str(e.value)


def test_all_answers_unlearned_drops_the_row(tmp_path, tokenizer):
    rows = [_chat({k: {"train": False} for k in range(3)}), _chat({})]
    _dataset(tmp_path, rows)
    examples, counts, _, _ = _encode(tmp_path, tokenizer, rows)
    assert len(examples) == 1 and counts.dropped == 1
    assert "row 1: no label tokens: every answer is marked train: false" in counts.reasons[0]


def test_mask_history_and_train_on_prompt_compose(tmp_path, tokenizer):
    rows = [_chat({0: {"train": False}, 1: {"weight": 0.5}, 2: {"weight": 2}}), _chat({2: {"train": False}})]
    _dataset(tmp_path, rows)
    # mask_history: only the last answer, with its weight; a last answer not to learn leaves nothing (dropped)
    (example,), counts, template, attr = _encode(tmp_path, tokenizer, rows, mask_history=True)
    assert counts.dropped == 1
    conversation = to_conversation(load_rows(attr)[0], attr, attr.path, 0)
    a2, b2 = _spans(template, tokenizer, conversation)[2]
    assert np.flatnonzero(example[1] != IGNORE_INDEX).tolist() == list(range(a2, b2))
    assert (example.weights[a2:b2] == 2).all()
    # train_on_prompt: prompts learned with weight 1, the train: false answer stays unlearned
    (example, other), _, _, _ = _encode(tmp_path, tokenizer, rows, train_on_prompt=True)
    spans = _spans(template, tokenizer, conversation)
    learned = example[1] != IGNORE_INDEX
    (a0, b0), (a1, b1) = spans[0], spans[1]
    assert not learned[a0:b0].any()
    assert learned[:a0].all() and learned[b0:].all()  # everything else, prompts included
    prompt = np.ones(len(learned), bool)
    for a, b in spans:
        prompt[a:b] = False
    assert (example.weights[prompt] == 1).all() and (example.weights[a1:b1] == 0.5).all()
    assert (other[1] != IGNORE_INDEX).sum() < len(other[1])  # its last answer (train: false) is not learned


def test_efficient_eos_closing_a_marked_answer_follows_it(tmp_path, tokenizer):
    """breeze learns each answer's EOS on the next prompt's first token: it belongs to the answer."""
    rows = [_chat({0: {"train": False}, 1: {"weight": 0.5}}), _chat({})]
    _dataset(tmp_path, rows)
    (marked, plain), _, _, _ = _encode(tmp_path, tokenizer, rows, template="breeze")
    eos = tokenizer.eos_token_id
    eos_at = [i for i in np.flatnonzero(plain[1] == eos)]  # the EOS labels of answers 0, 1 and the final one
    assert len(eos_at) == 3
    assert marked[1][eos_at[0]] == IGNORE_INDEX and marked.weights[eos_at[0]] == 0
    assert marked[1][eos_at[1]] == eos and marked.weights[eos_at[1]] == 0.5
    assert marked[1][eos_at[2]] == eos and marked.weights[eos_at[2]] == 1.0


def test_batched_tokenizing_gives_the_same_weights(tmp_path, tokenizer):
    rows = [_chat({0: {"train": False}, 1: {"weight": 0.5}}), _chat({}), _chat({2: {"weight": 4}})]
    _dataset(tmp_path, rows)
    one, _, _, _ = _encode(tmp_path, tokenizer, rows, chunk=1)
    many, _, _, _ = _encode(tmp_path, tokenizer, rows, chunk=3)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(weights_of(a), weights_of(b))
        assert type(a) is type(b)


def test_weights_survive_the_cache_tokenized_path_and_workers(tmp_path, new_tokenizer, monkeypatch):
    rows = [_chat({0: {"train": False}, 1: {"weight": 0.5}}), _chat({})] * 3
    _dataset(tmp_path, rows)
    from jaxsft.data import encode
    monkeypatch.setattr(encode, "MIN_ROWS_PER_WORKER", 2)
    in_workers = build_datasets(DataArgs(dataset="chat", dataset_dir=str(tmp_path), template="qwen", cutoff_len=512,
                                         preprocessing_num_workers=2, data_cache_dir=None), new_tokenizer())
    args = DataArgs(dataset="chat", dataset_dir=str(tmp_path), template="qwen", cutoff_len=512,
                    data_cache_dir=str(tmp_path / "cache"), tokenized_path=str(tmp_path / "tok"))
    first = build_datasets(args, new_tokenizer())
    assert first.weighted and len(first.train) == 6
    cached = build_datasets(args.replace(tokenized_path=None), new_tokenizer())
    saved = build_datasets(args.replace(data_cache_dir=None), new_tokenizer())  # from tokenized_path
    assert saved.stats["source"].startswith("tokenized_path")
    for data in (cached, saved, in_workers):
        assert data.weighted
        for a, b in zip(first.train, data.train):
            np.testing.assert_array_equal(a[1], b[1])
            np.testing.assert_array_equal(weights_of(a), weights_of(b))
            assert type(a) is type(b)
    files = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(files) == 1
    arrays = np.load(tmp_path / "cache" / files[0] / "train.npz")
    assert set(arrays.files) == {"ids", "labels", "offsets", "weights", "weighted"}


def test_unweighted_data_carries_no_weights(data_dir, tokenizer):
    args = DataArgs(dataset="identity", dataset_dir=str(data_dir), template="qwen", cutoff_len=128, max_samples=20)
    data = build_datasets(args, tokenizer)
    assert not data.weighted
    assert "weights" not in next(data.train_iterator(2, seed=0))
    assert all(type(e) is tuple for e in data.train)


def test_packed_rows_carry_each_examples_weights(tmp_path, tokenizer):
    rows = [_chat({0: {"train": False}, 1: {"weight": 0.5}}), _chat({}), _chat({2: {"weight": 4}})]
    _dataset(tmp_path, rows)
    examples, _, _, _ = _encode(tmp_path, tokenizer, rows)
    n = sum(len(e[0]) for e in examples)
    row = make_row(examples, [2, 0, 1], n + 5, pad_id=0, weighted=True)
    at = 0
    for m in (2, 0, 1):
        k = len(examples[m][0])
        np.testing.assert_array_equal(row["weights"][at:at + k - 1], weights_of(examples[m])[1:])
        assert row["weights"][at + k - 1] == 0  # an example's last token predicts nothing
        at += k
    assert (row["weights"][at:] == 0).all()
    np.testing.assert_array_equal(row["weights"] > 0, row["targets"] != IGNORE_INDEX)
    batches = list(eval_batches(examples, 512, 0, packing=False, rows_per_process=2))
    assert all(b["weights"].dtype == np.float32 and b["weights"].shape == b["targets"].shape for b in batches)
    assert sum(float(b["weights"].sum()) for b in batches) == pytest.approx(
        sum(float(weights_of(e)[1:].sum()) for e in examples))


def test_streaming_rows_carry_weights(tmp_path, tokenizer):
    rows = [_chat({0: {"train": False}, 1: {"weight": 0.5}}), _chat({})] * 2
    path = _dataset(tmp_path, rows)
    path.with_suffix(".jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["chat"]["file_name"] = "chat.jsonl"
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    args = DataArgs(dataset="chat", dataset_dir=str(tmp_path), template="qwen", cutoff_len=512, streaming=True)
    data = build_datasets(args, tokenizer)
    batch = next(data.train_iterator(4, seed=0, num_epochs=1))
    memory, _ = encode_list([(resolve("chat", str(tmp_path))[0], i, r) for i, r in enumerate(rows)],
                            make_template(args, tokenizer), tokenizer, args)
    assert float(batch["weights"].sum()) == pytest.approx(sum(float(weights_of(e)[1:].sum()) for e in memory))
    assert sorted(set(batch["weights"].ravel().tolist())) == [0.0, 0.5, 1.0]


def test_weighted_sft_with_replay_rows_carry_both():
    """weighted_chat (answers with loss weights) + replay: rows carry `weights` and `replay`; replay tokens
    weigh 1 (plain text), SFT tokens their answers' weights."""
    from jaxsft.data.packing import weights_of

    repo = Path(__file__).resolve().parents[2]
    args = DataArgs(dataset="identity,weighted_chat", dataset_dir=str(repo / "examples" / "data"), template="llama3",
                    cutoff_len=256, packing=True, data_cache_dir=None, replay_dataset="general_replay",
                    replay_ratio=0.25)
    data = build_datasets(args, AutoTokenizer.from_pretrained(str(repo / "examples" / "tiny-llama")))
    assert data.weighted
    batches = list(data.train_iterator(2, seed=3, num_epochs=1))
    seen = set()
    for batch in batches:
        learned = batch["targets"] != -100
        np.testing.assert_array_equal(batch["weights"] > 0, learned)
        replay = (batch["replay"] == 1) & learned
        assert replay.any() and (batch["weights"][replay] == 1.0).all()
        seen |= set(batch["weights"][learned & ~replay].tolist())
    assert {0.5, 2.0} <= seen  # answers' weights from weighted_chat
    assert sum(weights_of(e)[1:].sum() for e in data.train if getattr(e, "weights", None) is not None) > 0
