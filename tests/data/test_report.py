"""The data report (`jaxsft inspect`, `tools/inspect_data.py`): jaxsft/data/audit.py and report.py.

The page is checked twice: parsed with html.parser (always; sections, findings, dropped rows, learned spans)
and opened in headless Chromium (screenshot, DOM, no console errors) where Chromium is installed.
"""

import collections
import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from jaxsft.browser import find_chromium, open_page, screenshot
from jaxsft.data.audit import learned_texts
from jaxsft.data.report import REPORT_NAME, SECTIONS
from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny-llama"
EXAMPLE_DATA = REPO / "examples" / "data"


class Page(HTMLParser):
    """What the checks need of the report: section ids, finding boxes (level, title), dropped-row table rows,
    the learned text of each rendered example, and anything that would load from outside the file."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.findings, self.dropped, self.examples, self.external = [], [], [], [], []
        self.truncated = []
        self._stack, self._box, self._row, self._cell = [], None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        self._stack.append((tag, classes))
        if tag in ("script", "link", "iframe", "img") or any(k in attrs for k in ("src", "href")):
            self.external.append((tag, attrs))
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "div" and "box" in classes:
            self._box = [classes[1], ""]
        if tag == "pre" and "tok" in classes:
            self.examples.append("")
        if tag == "tr" and self.sections and self.sections[-1] == "dropped":
            self._row = []
        if tag == "td" and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        self._stack.pop()
        if tag == "div" and self._box is not None:
            level, title = self._box
            self.findings.append((level, title.removeprefix(f"{level.upper()}: ")))
            self._box = None
        if tag == "td" and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        if tag == "tr" and self._row is not None:
            if len(self._row) == 3:  # file, row, reason (the truncated rows' table has four columns)
                self.dropped.append(self._row)
            elif len(self._row) == 4:
                self.truncated.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._box is not None and any(t == "b" for t, _ in self._stack):
            self._box[1] += data
        if self._cell is not None:
            self._cell += data
        if any("L" in c for t, c in self._stack if t == "span") and any(t == "pre" for t, _ in self._stack):
            self.examples[-1] += data.replace("\u21b5", "")


def _config(tmp_path, **keys) -> Path:
    values = {"model_name_or_path": str(TINY), "template": "llama3", "dataset": "identity",
              "dataset_dir": str(EXAMPLE_DATA), "cutoff_len": 256, "packing": True, "val_size": 0.1,
              "per_device_train_batch_size": 2, "output_dir": str(tmp_path / "out"), **keys}
    path = tmp_path / "cfg.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


def _inspect(capsys, config: Path, *extra: str) -> tuple[str, str]:
    assert cli(["inspect", str(config), *extra]) == 0
    out = capsys.readouterr().out
    html_path = next(line for line in out.splitlines() if line.startswith("report: ")).removeprefix("report: ")
    return out, Path(html_path).read_text(encoding="utf-8")


def test_report_of_the_example_data_has_its_sections_counts_and_learned_spans(tmp_path, capsys):
    from jaxsft.config_load import load_config
    from jaxsft.data.args import DataArgs
    from jaxsft.data.pipeline import build_datasets
    from jaxsft.runtime import load_tokenizer

    config = _config(tmp_path)
    out, text = _inspect(capsys, config, "--examples", "3")
    assert (tmp_path / "out" / REPORT_NAME).exists()  # output_dir, without --out
    page = Page(text)
    assert page.sections == list(SECTIONS)
    assert page.findings == [("ok", "No problems found")] and "no problems found" in out
    assert page.external == [], "the page must load nothing from outside itself"
    assert text.count("<svg") == 4  # length and learned-token histograms, train and eval

    cfg = load_config(str(config))
    tokenizer = load_tokenizer(cfg)
    data = build_datasets(DataArgs.from_config(cfg), tokenizer)
    rows = len(json.loads((EXAMPLE_DATA / "identity.json").read_text()))
    learned = sum(int(np.count_nonzero(labels[1:] != -100)) for _, labels in data.train)
    tokens = sum(len(ids) for ids, _ in data.train)
    assert f"rows read: {data.stats['train_rows_read']}" in out and data.stats["train_rows_read"] + \
        data.stats["eval_rows_read"] == rows
    assert f"learned tokens (label share): {learned} ({100 * learned / tokens:.1f}%)" in out
    assert f"<td class=l>learned tokens (label share)</td><td>{learned} ({100 * learned / tokens:.1f}%)</td>" in text
    fill = data.stats["train_packing_efficiency"]
    assert f"packing fill (tokens / rows x cutoff_len): {100 * fill:.1f}%" in out
    # the rendered examples are the first training examples; their highlighted text is what the labels learn
    assert len(page.examples) == 1 + 3  # the template probe, then the examples
    for k, shown in enumerate(page.examples[1:]):
        ids, labels = data.train[k]
        assert shown == "".join(learned_texts(tokenizer, ids, labels)) and shown


def test_dropped_rows_of_a_bad_file_are_listed_by_row_number(tmp_path, capsys):
    rows = [{"instruction": "hi", "output": "hello"},
            {"instruction": "no answer"},  # no response: LLaMA-Factory drops it
            {"instruction": "ok", "output": "fine"},
            {"instruction": 5, "output": "a number is no instruction"},  # malformed
            {},  # an empty row: no response either
            {"instruction": "bye", "output": "goodbye"},
            {"instruction": "hi", "output": "hello"},  # a duplicate of row 1
            {"instruction": "long " * 300, "output": "cut"}]  # longer than cutoff_len
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, text = _inspect(capsys, _config(tmp_path, dataset=str(bad), val_size=0.0, skip_invalid_examples=True,
                                         eval_dataset=str(bad)), "--out", str(tmp_path / "report"))
    assert (tmp_path / "report" / REPORT_NAME).exists()
    page = Page(text)
    listed = [(Path(f).name, int(r), reason) for f, r, reason in page.dropped]
    # rows (and lines) count from 1; the eval split (the same file) lists them too
    assert [(name, r) for name, r, _ in listed] == [("bad.jsonl", 2), ("bad.jsonl", 4), ("bad.jsonl", 5)] * 2
    assert "no response" in listed[0][2] and "field 'instruction'" in listed[1][2]
    assert ("note", "3 train rows dropped") in page.findings
    assert ("warning", "5 eval examples also in the training data") in page.findings  # all of them
    assert [(Path(f).name, int(r)) for f, r, *_ in page.truncated] == [("bad.jsonl", 8)] * 2
    full, cut = (int(x) for x in page.truncated[0][2:])
    assert full > 256 and cut == full - 256  # the prompt is cut to make room for the answer
    assert f"train: 1 example truncated to cutoff_len=256 ({cut} tokens cut)" in text
    assert f"truncated: {bad}, row 8: {full} tokens, {cut} cut" in out
    assert "duplicate examples (same tokens as an earlier one): 1" in out
    assert "rows dropped: 3" in out and f"dropped: {bad}, row 4, field 'instruction'" in out


CHAT_USER_ONLY = ("{% for m in messages %}{% if m['role'] == 'user' %}<|start_header_id|>user<|end_header_id|>\n\n"
                  "{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHAT_NO_GENERATION_PROMPT = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                             "{{ m['content'] }}<|eot_id|>{% endfor %}")


def _tokenizer_with_chat_template(tmp_path: Path, chat_template: str) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(TINY / name, model / name)
    tokenizer_config = json.loads((TINY / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": chat_template}))
    return model


CHAT_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.mark.parametrize("case", ["learns_nothing", "header_learned", "train_on_prompt", "markup_in_answers",
                                  "other_models_template"])
def test_templates_that_learn_nothing_or_prompt_text_are_flagged_at_the_top(tmp_path, capsys, case):
    keys = {"max_samples": 8, "val_size": 0.0, "per_device_train_batch_size": 1, "packing": False}
    if case == "learns_nothing":  # a chat template that renders no assistant turn
        keys.update(template="auto", model_name_or_path=str(_tokenizer_with_chat_template(tmp_path, CHAT_USER_ONLY)))
    elif case == "header_learned":  # one that ignores add_generation_prompt: the header falls into the answer
        keys.update(template="auto", model_name_or_path=str(_tokenizer_with_chat_template(
            tmp_path, CHAT_NO_GENERATION_PROMPT)))
    elif case == "train_on_prompt":
        keys.update(train_on_prompt=True)
    elif case == "other_models_template":  # template llama3 for a model whose chat template is ChatML
        keys.update(model_name_or_path=str(_tokenizer_with_chat_template(tmp_path, CHAT_CHATML)))
    else:  # answers that hold another template's next user turn (rows rendered with a chat template already)
        rows = [{"instruction": "hi", "output": "hello"},
                {"instruction": "hey", "output": "hello<|im_end|>\n<|im_start|>user\nand now?"}]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        keys.update(dataset=str(tmp_path / "rows.jsonl"))
    out, text = _inspect(capsys, _config(tmp_path, **keys))
    page = Page(text)
    expected = {"learns_nothing": [("error", "The template learns nothing"),
                                   ("error", "No train example learns anything")],
                "header_learned": [("warning", "The assistant header is learned")],
                "train_on_prompt": [("warning", "Prompt text is learned"),
                                    ("warning", "Prompt tokens are learned")],
                "markup_in_answers": [("warning", "Learned text holds chat markup")],
                "other_models_template": [("warning", "Template 'llama3' does not match the model's chat template")]
                }[case]
    assert [f for f in page.findings if f in expected] == expected
    assert text.index("<section id=findings>") < text.index("<section id=counts>")  # flagged at the top
    first = out.index("+---")  # the terminal box, before the counts
    assert first < out.index("== train") and all(f"{level.upper()}: {title}" in out[first:out.index("== train")]
                                                 for level, title in expected)
    if case == "learns_nothing":
        assert [int(r) for _, r, _ in page.dropped] == list(range(1, 9))
        assert all("the template learns nothing of this row" in reason for *_, reason in page.dropped)
        assert len(page.examples) == 1 + 5  # the probe, then the first rows that learn nothing
    if case == "train_on_prompt":  # every token but each example's first is learned; the prompts' are counted
        from jaxsft.config_load import load_config
        from jaxsft.data.args import DataArgs
        from jaxsft.data.pipeline import build_datasets
        from jaxsft.runtime import load_tokenizer

        cfg = load_config(str(tmp_path / "cfg.yaml"), ["train_on_prompt=false"])
        plain = build_datasets(DataArgs.from_config(cfg), load_tokenizer(cfg))
        answers = sum(int(np.count_nonzero(labels[1:] != -100)) for _, labels in plain.train)
        learned = sum(len(ids) - 1 for ids, _ in plain.train)
        assert f"{learned - answers} of the {learned} learned train tokens" in html.unescape(text)
    if case == "other_models_template":
        # (<|eot_id|> is the EOS here, which a template may use either way)
        assert "(<|end_header_id|>, <|start_header_id|>); the model's template uses none." in html.unescape(text)
    if case == "markup_in_answers":
        assert f"1 of the first 2 examples learn another turn's header" in html.unescape(text)
        assert f"{tmp_path / 'rows.jsonl'}, row 2 ('<|im_start|>user')" in html.unescape(text)
    if case == "header_learned":
        assert "learned: '<|start_header_id|>assistant<|end_header_id|>\\n\\n'" in html.unescape(text)


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium installed (apt-get install chromium); the page is "
                                                  "still checked without a browser by the html.parser tests")
def test_report_opens_in_headless_chromium_without_console_errors(tmp_path, capsys):
    from PIL import Image

    rows = [{"instruction": "hi", "output": "hello"}, {"instruction": "no answer"},
            {"instruction": "<b>tags</b> & \"quotes\"", "output": "<script>alert(1)</script>"}]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    shot = tmp_path / "shot" / "report.png"
    out, _ = _inspect(capsys, _config(tmp_path, dataset=str(data), val_size=0.0), "--out", str(tmp_path),
                      "--screenshot", str(shot), "--size", "1000x1400")
    assert f"screenshot: {shot}" in out  # written, and the page logged nothing to the console
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (1400, 1000) and (image < 200).mean() > 0.01  # drawn, not a blank page
    report = tmp_path / REPORT_NAME
    dom, console = open_page(report, "--dump-dom")
    assert console == [], console
    assert all(f'<section id="{s}">' in dom for s in SECTIONS)
    assert "<script" not in dom, dom[dom.index("<script") - 300:][:500]
    # the row's markup is shown as text, never run
    assert "<script>alert(1)</script>" in html.unescape(re.sub(r"<[^>]+>", "", dom))
    broken = tmp_path / "broken.html"  # the console check sees a page's errors
    broken.write_text("<html><body><script>console.error('boom'); missing();</script></body></html>")
    assert "boom" in " ".join(open_page(broken, "--dump-dom")[1])
    assert "boom" in " ".join(screenshot(broken, tmp_path / "broken.png", 200, 200))


@pytest.mark.parametrize("packing,replay", [(True, False), (False, False), (True, True)])
def test_batch_fill_is_the_fill_of_the_batches_training_reads(packing, replay):
    """fill_of (the report's figure) against epoch 0's real batches: non-padding positions / all positions,
    and the replay tokens among them."""
    from jaxsft.config_load import load_config
    from jaxsft.data.args import DataArgs
    from jaxsft.data.audit import fill_of
    from jaxsft.data.packing import length_buckets
    from jaxsft.data.pipeline import build_datasets
    from jaxsft.runtime import load_tokenizer

    cfg = load_config(None, [f"model_name_or_path={TINY}", "template=llama3", "dataset=identity",
                             f"dataset_dir={EXAMPLE_DATA}", "cutoff_len=256", f"packing={str(packing).lower()}"]
                      + (["replay_dataset=general_replay", "replay_ratio=0.25"] if replay else []))
    data = build_datasets(DataArgs.from_config(cfg), load_tokenizer(cfg))
    buckets = length_buckets(cfg.cutoff_len)
    fill = fill_of(data, 4, cfg.seed, buckets, False)
    batches = data.train_dataset(4, cfg.seed, 1, buckets)
    real = [batches[i]["segment_ids"] for i in range(len(batches))]
    assert fill.batches == len(real) and fill.positions == sum(s.size for s in real)
    assert fill.tokens == sum(int((s != 0).sum()) for s in real) and 0 < fill.fill < 1
    assert sorted({s.shape[1] for s in real}) == [w for w, *_ in fill.buckets]
    if replay:
        replayed = sum(int(batches[i]["replay"].sum()) for i in range(len(batches)))
        assert fill.replay_tokens == replayed and abs(replayed / fill.tokens - 0.25) < 0.02
    if not packing:
        assert fill.rows == len(data.train) and len(fill.buckets) > 1  # examples padded to several buckets


def test_the_template_probe_flags_no_known_template_and_flags_train_on_prompt(new_tokenizer):
    """Every named template learns its answers only (no false alarm: efficient_eos's EOS, reasoning templates'
    empty thought, mistral's leading space are the answer's); train_on_prompt is caught on each."""
    from jaxsft.data.args import DataArgs
    from jaxsft.data.audit import probe_template
    from jaxsft.data.encode import make_template
    from jaxsft.data.templates import TEMPLATES

    for name, template in TEMPLATES.items():
        tokenizer = new_tokenizer()
        args = DataArgs(template=name)
        sample, findings = probe_template(make_template(args, tokenizer), tokenizer, args)
        assert findings == [], (name, findings)
        assert "answerprobe2" in "".join(learned_texts(tokenizer, sample.ids, sample.labels)), name
        if not template.efficient_eos:  # (those refuse train_on_prompt)
            args = args.replace(train_on_prompt=True)
            _, findings = probe_template(make_template(args, tokenizer), tokenizer, args)
            assert [f.title for f in findings] == ["Prompt text is learned"], (name, findings)


def test_a_streaming_config_is_read_in_memory_and_says_so(tmp_path, capsys):
    out, text = _inspect(capsys, _config(tmp_path, streaming=True, max_steps=1, max_samples=8, val_size=0.0,
                                         per_device_train_batch_size=1))
    assert ("note", "Streaming data read in memory") in Page(text).findings
    assert "rows read: 8\n  examples kept: 8\n" in out


def test_retention_and_replay_data_are_counted_beside_the_training_data(tmp_path, capsys):
    out, text = _inspect(capsys, _config(tmp_path, retention_dataset="general_text", replay_dataset="general_replay",
                                         replay_ratio=0.25, val_size=0.0))
    rows = {name: len((EXAMPLE_DATA / f"{name}.jsonl").read_text().splitlines())
            for name in ("general_text", "general_replay")}
    assert f"== retention\n  rows read: {rows['general_text']}\n" in out
    assert f"== replay\n  rows read: {rows['general_replay']}\n" in out
    assert "<th>train</th><th>retention</th><th>replay</th>" in text
    assert "replay share (replay tokens / tokens): 2" in out  # about 25%
    assert ("ok", "No problems found") in Page(text).findings  # plain text learns every token: no prompt flag


def test_per_token_weights_are_counted_and_shown(tmp_path, capsys):
    """Answers weighted in the data (examples/data/weighted_chat.json: "weight": w, "train": false): the sum of
    loss weights is counted, and each rendered example shows the weights its learned tokens carry."""
    from jaxsft.config_load import load_config
    from jaxsft.data.args import DataArgs
    from jaxsft.data.audit import learned_mask
    from jaxsft.data.packing import weights_of
    from jaxsft.data.pipeline import build_datasets
    from jaxsft.runtime import load_tokenizer

    config = _config(tmp_path, dataset="weighted_chat", val_size=0.0, per_device_train_batch_size=1)
    out, text = _inspect(capsys, config, "--examples", "20")
    cfg = load_config(str(config))
    data = build_datasets(DataArgs.from_config(cfg), load_tokenizer(cfg))
    total = sum(float(weights_of(ex)[learned_mask(ex[1])].sum()) for ex in data.train)
    assert any(getattr(ex, "weights", None) is not None for ex in data.train)
    assert f"learned tokens, weighted (sum of loss weights): {total:.6g}" in out
    per_weight = collections.Counter(float(w) for ex in data.train for w in weights_of(ex)[learned_mask(ex[1])])
    assert "learned tokens per loss weight: " + ", ".join(f"{w:g}: {per_weight[w]}" for w in sorted(per_weight)) \
        in out and len(per_weight) > 2
    badges = [re.findall(r"<span class=w>w=([^<]+)</span>", example)
              for example in text.split("<div class=ex>")[2:]]  # after the probe
    assert len(badges) == len(data.train)
    for example, shown in zip(data.train, badges):
        weights = getattr(example, "weights", None)
        expected = set() if weights is None else {f"{w:g}" for w in np.asarray(weights)[learned_mask(example[1])]}
        assert set(shown) == expected
    assert any(len(set(shown)) > 1 for shown in badges)  # an example whose answers differ in weight


def test_the_models_own_chat_template_is_no_mismatch(tmp_path, capsys):
    """template: llama3 for a model whose chat template renders Llama 3 turns (BOS left to the chat template)."""
    model = _tokenizer_with_chat_template(tmp_path, CHAT_LLAMA3)
    out, text = _inspect(capsys, _config(tmp_path, max_samples=8, val_size=0.0, per_device_train_batch_size=1,
                                         packing=False, model_name_or_path=str(model)))
    assert Page(text).findings == [("ok", "No problems found")]
