"""Bad inputs, faults and preemption: nothing is lost and every error says what, where and how to fix it.

Malformed data and configs are checked message by message; the fault tests train the embedded tiny Llama
(NaN/inf loss, kill -9 during a checkpoint save then resume, a full disk while saving).
"""

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from jaxsft.data.args import DataArgs
from jaxsft.config import ConfigError
from jaxsft.config_load import build_config
from jaxsft.data.formats import InvalidExample
from jaxsft.data.pipeline import build_datasets
from jaxsft.errors import InputError, MissingPath, UserError
from jaxsft.main import cli
from jaxsft.preflight import validate_run

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny-llama"
DATA = REPO / "examples" / "data"
TOKENIZER = REPO / "tests" / "fixtures" / "data" / "tokenizer"
TMP = ".orbax-checkpoint-tmp"  # orbax 0.12: checkpoint_<step>.orbax-checkpoint-tmp, renamed on commit


# ---------------------------------------------------------------------------------------------------------------
# 1. Malformed data: one file per case, every row bad; the error names the file, the row and the field.

def _sharegpt(*turns, **extra):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def _parquet_missing_output(path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"instruction": ["hi", "yo"], "answer": ["a", "b"]}), path)


OK = {"instruction": "hi", "input": "", "output": "hello"}
CALL = '{"name": "f", "arguments": {}}'
DATA_CASES = [
    # (id, file name, content: rows (json), str/bytes (raw) or a writer, expected error with {path}
    #  [, a dataset_info.json entry when the file is named through the registry])
    ("missing_key_in_turn", "a.json", [_sharegpt(("human", "hi"), ("gpt", "yo")) | {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}],
     "{path}, row 1, field 'conversations[1]': missing key 'value' in {{'from': 'gpt'}}"),
    ("instruction_not_a_string", "a.json", [OK, {"instruction": 5, "output": "x"}],
     "{path}, row 2, field 'instruction': expected a string, got int 5"),
    ("content_not_a_string", "a.json", [_sharegpt(("human", ["hi"]), ("gpt", "yo"))],
     "{path}, row 1, field 'conversations[0].value': expected a string, got list ['hi']"),
    ("conversations_not_a_list", "a.json", [_sharegpt(("human", "q"), ("gpt", "a")), {"conversations": "hi"}],
     "{path}, row 2, field 'conversations': expected a list of turns, got 'hi'"),
    ("row_not_an_object", "a.json", [OK, "just text"],
     "{path}, row 2, field '<row>': expected a JSON object, got 'just text'"),
    ("history_not_pairs", "a.json", [{"instruction": "q", "output": "a", "history": [["only one"]]}],
     "{path}, row 1, field 'history[0]': expected a [prompt, response] pair, got ['only one']"),
    ("function_call_not_json", "a.json",
     [_sharegpt(("human", "q"), ("function_call", "{not json"), ("observation", "r"), ("gpt", "a"))],
     "{path}, row 1, field 'conversations[1].value': a function call is not valid JSON (Expecting property name "
     "enclosed in double quotes: line 1 column 2 (char 1)): '{{not json'"),
    ("tools_not_json", "a.json", [_sharegpt(("human", "q"), ("gpt", "a"), tools="[{name: f}")],
     "{path}, row 1, field 'tools': tools is not valid JSON (Expecting property name enclosed in double quotes: "
     "line 1 column 3 (char 2)): '[{{name: f}}'"),
    ("openai_tool_calls_malformed", "a.json", [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]}],
     "{path}, row 1, field 'messages[1].tool_calls': expected a list of {{'function': ...}} objects, got "
     "[{{'name': 'f'}}]", {"formatting": "openai", "columns": {"messages": "messages"},
                           "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                    "assistant_tag": "assistant", "observation_tag": "tool",
                                    "function_tag": "function_call", "system_tag": "system"}}),
    ("empty_response_everywhere", "a.json", [{"instruction": "q"}, {"instruction": "r", "output": None}],
     "No training examples left after preprocessing {path} (2 rows): 2 of 2 rows were dropped, first reasons: "
     "{path}, row 1, field 'output': no response (got None); {path}, row 2, field 'output': no response (got None)"
     ". Fix those rows, or the dataset's formatting/columns in dataset_info.json; a run with no data would train "
     "nothing."),
    ("unknown_role", "a.json", [_sharegpt(("human", "q"), ("bot", "a"))],
     "No training examples left after preprocessing {path} (1 rows): 1 of 1 rows were dropped, first reasons: "
     "{path}, row 1, field 'conversations[1].from': unknown role 'bot' (this dataset's roles: 'human', 'gpt', "
     "'observation', 'function_call', 'system'; set them in tags of dataset_info.json). Fix those rows, or the "
     "dataset's formatting/columns in dataset_info.json; a run with no data would train nothing."),
    ("turns_do_not_alternate", "a.jsonl", json.dumps(_sharegpt(("human", "q"), ("human", "again"))) + "\n",
     "No training examples left after preprocessing {path} (1 rows): 1 of 1 rows were dropped, first reasons: "
     "{path}, row 1, field 'conversations[1].from': role 'human' out of order (expected one of ['gpt', "
     "'function_call']). Fix those rows, or the dataset's formatting/columns in dataset_info.json; a run with no "
     "data would train nothing."),
    ("non_utf8_json", "a.json", b'[\n{"instruction": "caf\xe9", "output": "x"}\n]',
     "{path}, line 2: not UTF-8 text (byte 0xe9: invalid continuation byte); re-save the file as UTF-8"),
    ("non_utf8_jsonl", "a.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n',
     "{path}, line 2: not UTF-8 text (byte 0xff: invalid start byte); re-save the file as UTF-8"),
    ("json_syntax", "a.json", '[{"instruction": "hi", "output": "x"},\n]',
     "{path}: invalid JSON at line 2, column 1: Expecting value"),
    ("jsonl_syntax", "a.jsonl", json.dumps(OK) + "\n" + '{"instruction": "hi", "output": }\n',
     "{path}, line 2: invalid JSON: Expecting value: line 1 column 33 (char 32)"),
    ("csv_does_not_parse", "a.csv", "instruction,output\nhi,there\na,b,c,d\n",
     "{path}: cannot be read as csv: ParserError: Error tokenizing data. C error: Expected 2 fields in line 3, saw 4"),
    ("parquet_corrupt", "a.parquet", b"PAR1 this is not parquet",
     "{path}: cannot be read as parquet: ArrowInvalid: Parquet magic bytes not found in footer. Either the file "
     "is corrupted or this is not a parquet file."),
    ("parquet_without_response_column", "a.parquet", _parquet_missing_output,
     "No training examples left after preprocessing {path} (2 rows): 2 of 2 rows were dropped, first reasons: "
     "{path}, row 1, field 'output': no response (got None); {path}, row 2, field 'output': no response (got None)"
     ". Fix those rows, or the dataset's formatting/columns in dataset_info.json; a run with no data would train "
     "nothing."),
    ("alpaca_without_its_prompt_column", "a.csv", "instr,output\nhi,there\n",
     "dataset '{path}': {path} has no column 'instruction', where alpaca data keeps the prompt (its columns: "
     "instr, output). Did you mean 'instr'? Rename the column, or name it in dataset_info.json (\"columns\": "
     "{{\"prompt\": ...}})"),
    ("sharegpt_without_its_messages_column", "a.json", [{"conversation": [{"from": "human", "value": "hi"}]}],
     "dataset 'ds': {path} has no column 'conversations', where sharegpt data keeps the messages (its columns: "
     "conversation). Did you mean 'conversation'? Rename the column, or name it in dataset_info.json (\"columns\": "
     "{{\"messages\": ...}})", {"formatting": "sharegpt"}),
    ("empty_file", "a.json", [],
     "No training examples left after preprocessing {path} (0 rows): no rows to train on. Fix those rows, or the "
     "dataset's formatting/columns in dataset_info.json; a run with no data would train nothing."),
]


def _write(path: Path, content) -> None:
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))


def _args(dataset, dataset_dir, **kw):
    return DataArgs(**{"dataset": str(dataset), "dataset_dir": str(dataset_dir), "template": "qwen",
                    "cutoff_len": 64, "skip_invalid_examples": False, **kw})


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_malformed_data_is_named_by_file_row_and_field(tmp_path, case):
    _, name, content, expected, *entry = case
    path = tmp_path / name
    _write(path, content)
    dataset = path
    if entry:
        (tmp_path / "dataset_info.json").write_text(json.dumps({"ds": {"file_name": name, **entry[0]}}))
        dataset = "ds"
    with pytest.raises(UserError) as e:
        build_datasets(_args(dataset, tmp_path), AutoTokenizer.from_pretrained(str(TOKENIZER)))
    assert str(e.value) == expected.format(path=path)
    assert isinstance(e.value, InputError)  # a ValueError too, for callers that catch that


def test_skip_invalid_examples_counts_and_reports_the_first_reasons(tmp_path, caplog):
    path = tmp_path / "mixed.json"
    rows = [OK, {"instruction": 3, "output": "x"}, OK, {"instruction": "q"}, "text", OK]
    path.write_text(json.dumps(rows))
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    with pytest.raises(InvalidExample, match=r"row 2, field 'instruction'"):
        build_datasets(_args(path, tmp_path), tokenizer)
    data = build_datasets(_args(path, tmp_path, skip_invalid_examples=True), tokenizer)
    reasons = [f"{path}, row 2, field 'instruction': expected a string, got int 3",
               f"{path}, row 4, field 'output': no response (got None)",
               f"{path}, row 5, field '<row>': expected a JSON object, got 'text'"]
    assert (data.stats["train_examples"], data.stats["train_dropped"]) == (3, 3)
    assert data.stats["train_dropped_reasons"] == reasons
    assert "train data: dropped 3 of 6 rows (the run goes on without them); first reasons:\n  " + "\n  ".join(
        reasons) in caplog.text
    # skipping everything is still an error, not a zero-step run
    path.write_text(json.dumps([{"instruction": 3, "output": "x"}]))
    with pytest.raises(InputError, match=r"No training examples left .* 1 of 1 rows were dropped"):
        build_datasets(_args(path, tmp_path, skip_invalid_examples=True), tokenizer)


def test_jsonl_rows_and_lines_are_counted_alike(tmp_path):
    """A bad field on the third line and a syntax error on the third line both say 3 (one convention: from 1)."""
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(OK), json.dumps(OK), json.dumps({"instruction": "q"})]) + "\n")
    data = build_datasets(_args(path, tmp_path), tokenizer)  # LF drops a row without a response
    assert data.stats["train_dropped_reasons"] == [f"{path}, row 3, field 'output': no response (got None)"]
    path.write_text("\n".join([json.dumps(OK), json.dumps(OK), '{"instruction": "q",']) + "\n")
    with pytest.raises(InputError) as e:
        build_datasets(_args(path, tmp_path), tokenizer)
    assert str(e.value).startswith(f"{path}, line 3: invalid JSON")


# ---------------------------------------------------------------------------------------------------------------
# 2. Bad config and paths: validate_run says so before anything compiles or loads weights.

def _config(tmp_path, **overrides):
    values = {"model_name_or_path": str(TINY), "dataset": "identity", "dataset_dir": str(DATA), "template": "llama3",
              "cutoff_len": 128, "do_train": True, "finetuning_type": "full", "output_dir": str(tmp_path / "out"),
              "report_to": "none"}
    return build_config({**values, **overrides})


def _model_copy(tmp_path, drop=(), add=None) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    for f in TINY.iterdir():
        if f.name not in drop:
            (model / f.name).symlink_to(f)
    for name, text in (add or {}).items():
        (model / name).write_text(text)
    return model


def _registry(tmp_path, entries: dict) -> Path:
    directory = tmp_path / "data"
    directory.mkdir(exist_ok=True)
    (directory / "dataset_info.json").write_text(json.dumps(entries))
    return directory


def _case_missing_model(tmp_path):
    return dict(model_name_or_path=str(tmp_path / "nope")), MissingPath, (
        f"model_name_or_path: {tmp_path / 'nope'} does not exist; give a local Hugging Face model directory "
        f"(config.json, tokenizer files, *.safetensors)")


def _case_hub_id_offline(tmp_path):
    return dict(model_name_or_path="meta-llama/NoSuchModel"), MissingPath, (
        "model_name_or_path: meta-llama/NoSuchModel does not exist (HF_HUB_OFFLINE is set, so a hub id cannot be "
        "downloaded); give a local Hugging Face model directory (config.json, tokenizer files, *.safetensors)")


def _case_no_config_json(tmp_path):
    model = _model_copy(tmp_path, drop=("config.json",))
    return dict(model_name_or_path=str(model)), MissingPath, (
        f"model_name_or_path: no config.json in {model}; a Hugging Face model directory holds config.json, "
        f"tokenizer files and *.safetensors")


def _case_unsupported_model(tmp_path):
    config = json.loads((TINY / "config.json").read_text()) | {"model_type": "gpt_neox"}
    model = _model_copy(tmp_path, drop=("config.json",), add={"config.json": json.dumps(config)})
    return dict(model_name_or_path=str(model)), InputError, re.compile(
        re.escape(f"{model}/config.json: ") + r".*'gpt_neox' is not supported; supported: llama, mistral, .*gemma.*phi3.*")


def _case_no_safetensors(tmp_path):
    model = _model_copy(tmp_path, drop=("model.safetensors",))
    return dict(model_name_or_path=str(model)), MissingPath, f"model_name_or_path: no *.safetensors in {model}."


def _case_only_pickled_weights(tmp_path):
    model = _model_copy(tmp_path, drop=("model.safetensors",), add={"pytorch_model.bin": "pickle"})
    return dict(model_name_or_path=str(model)), MissingPath, (
        f"model_name_or_path: no *.safetensors in {model}. It has pytorch_model.bin: pickled PyTorch weights are "
        "never loaded (unpickling runs code); convert them to safetensors first, e.g. "
        "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)` in a trusted "
        "environment.")


def _case_unknown_template(tmp_path):
    return dict(template="llama4"), ConfigError, re.compile(
        r"template: unknown template 'llama4'\. Known templates: auto, .*\bllama3\b.*\bqwen\b.*\bzephyr\.")


def _case_auto_without_chat_template(tmp_path):
    return dict(template="auto"), ConfigError, re.compile(re.escape(
        f"template: auto needs a tokenizer with a chat_template, and {TINY} has none (tokenizer_config.json, "
        f"chat_template.jinja). Pick a named template: ") + r".*llama3.*zephyr\.")


def _case_missing_dataset_dir(tmp_path):
    return dict(dataset_dir=str(tmp_path / "nodata")), MissingPath, re.compile(re.escape(
        f"dataset_dir: {tmp_path / 'nodata'} does not exist ({tmp_path / 'nodata'}); it should hold "
        f"dataset_info.json and the data files. dataset: Unknown dataset 'identity': not an entry of "
        f"{tmp_path / 'nodata' / 'dataset_info.json'} (no such file) and no file or folder at that path."))


def _case_unknown_dataset(tmp_path):
    return dict(dataset="identiy"), InputError, (
        f"Unknown dataset 'identiy': not an entry of {DATA}/dataset_info.json and no file or folder at that path. "
        f"Did you mean identity? Datasets present in {DATA}: "
        f"{', '.join(sorted(json.loads((Path(DATA) / 'dataset_info.json').read_text())))}.")


def _case_registry_file_missing(tmp_path):
    directory = _registry(tmp_path, {"chat": {"file_name": "chat.json"}})
    return dict(dataset="chat", dataset_dir=str(directory)), MissingPath, (
        f"dataset 'chat' in {directory}/dataset_info.json names 'chat.json', which is not in {directory}. Add the "
        f"file there, or use one of the datasets present: (none).")


def _case_registry_not_json(tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "dataset_info.json").write_text('{"chat": {"file_name": "chat.json",}}')
    return dict(dataset="chat", dataset_dir=str(directory)), InputError, (
        f"{directory}/dataset_info.json is not valid JSON: Expecting property name enclosed in double quotes: "
        f"line 1 column 36 (char 35)")


def _case_output_dir_holds_checkpoints(tmp_path):
    (tmp_path / "out" / "checkpoint_5").mkdir(parents=True)
    (tmp_path / "out" / f"checkpoint_10{TMP}").mkdir()  # an interrupted save is no checkpoint
    return {}, ConfigError, (
        f"output_dir {tmp_path / 'out'} already holds checkpoints (checkpoint_5); set resume_from_checkpoint: true "
        f"to continue, or overwrite_output_dir: true to start over")


def _case_resume_without_checkpoint(tmp_path):
    return dict(resume_from_checkpoint=True), MissingPath, (
        f"resume_from_checkpoint: no complete checkpoint in {tmp_path / 'out'}; train without "
        f"resume_from_checkpoint to start from step 0")


def _case_mesh_does_not_match_devices(tmp_path):
    return dict(mesh={"data": 3, "fsdp": 1, "tensor": 1}), ConfigError, (
        "mesh {'data': 3, 'fsdp': 1, 'tensor': 1} has 3 devices but 8 are available; make the product match or "
        "set one axis to -1")


CONFIG_CASES = [_case_missing_model, _case_hub_id_offline, _case_no_config_json, _case_unsupported_model,
                _case_no_safetensors, _case_only_pickled_weights, _case_unknown_template,
                _case_auto_without_chat_template, _case_missing_dataset_dir, _case_unknown_dataset,
                _case_registry_file_missing, _case_registry_not_json, _case_output_dir_holds_checkpoints,
                _case_resume_without_checkpoint, _case_mesh_does_not_match_devices]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.__name__[6:] for c in CONFIG_CASES])
def test_bad_paths_and_settings_fail_before_heavy_work(tmp_path, case):
    overrides, kind, expected = case(tmp_path)
    with pytest.raises(kind) as e:
        validate_run(_config(tmp_path, **overrides))
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(str(e.value)), str(e.value)
    else:
        assert str(e.value) == expected
    assert "\n" not in str(e.value)


def test_valid_run_passes_preflight(tmp_path):
    validate_run(_config(tmp_path, resume_from_checkpoint=None))
    validate_run(_config(tmp_path, template="qwen", dataset=str(DATA / "identity.json"), dataset_dir="/nowhere"))


def test_cli_prints_one_line_and_exits_2_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"model_name_or_path={tmp_path / 'nope'}", "dataset=identity", f"dataset_dir={DATA}",
            "template=llama3", "do_train=true", f"output_dir={out}"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err == (f"error: model_name_or_path: {tmp_path / 'nope'} does not exist; give a local Hugging Face model "
                   f"directory (config.json, tokenizer files, *.safetensors)\n")
    assert not out.exists()  # nothing ran
    assert cli(args[1:] + [f"model_name_or_path={TINY}", "template=llama9"]) == 2
    assert capsys.readouterr().err.startswith("error: template: unknown template 'llama9'. Known templates: auto, ")


def test_cli_keeps_the_traceback_of_a_real_bug(tmp_path, monkeypatch):
    import jaxsft.main

    def buggy_stage(cfg, trained=None):
        return {}["no such key"]

    monkeypatch.setattr(jaxsft.main, "_stages", lambda: {"train": buggy_stage})
    with pytest.raises(KeyError):
        cli([f"model_name_or_path={TINY}", "dataset=identity", f"dataset_dir={DATA}", "template=llama3",
             "do_train=true", f"output_dir={tmp_path / 'out'}"])


def test_an_unsupported_peft_adapter_is_one_line_and_exit_2(tmp_path, capsys):
    """A bad adapter_name_or_path is the user's to fix: one `error:` line naming the file, no traceback."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_bias": True}))
    code = cli([f"model_name_or_path={TINY}", "dataset=identity", f"dataset_dir={DATA}", "template=llama3",
                "do_train=true", "finetuning_type=lora", f"adapter_name_or_path={adapter}", "cutoff_len=128",
                f"output_dir={tmp_path / 'out'}", "report_to=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"error: {adapter / 'adapter_config.json'}: lora_bias=True is not supported by jaxsft "
                       "(supported: False); merge this adapter with PEFT first")
    assert not any("Traceback" in line for line in err)


# ---------------------------------------------------------------------------------------------------------------
# 3. Security.

def test_trust_remote_code_runs_no_code_and_a_custom_code_tokenizer_is_refused_by_name(tmp_path):
    """`trust_remote_code: true` (in every LLaMA-Factory example) is accepted, but code shipped with a model
    never runs: a tokenizer that exists only as such code is refused by name, before anything loads."""
    assert _config(tmp_path, trust_remote_code=True).trust_remote_code is True
    tokenizer_config = json.loads((TINY / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="EvilTokenizer",
                            auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    model = _model_copy(tmp_path, drop=("tokenizer_config.json",),
                        add={"tokenizer_config.json": json.dumps(tokenizer_config),
                             "tokenization_evil.py": "raise SystemExit('remote code ran')\n"})
    with pytest.raises(ConfigError) as e:
        validate_run(_config(tmp_path, trust_remote_code=True, model_name_or_path=str(model)), devices=False)
    assert str(e.value) == (
        f"model_name_or_path: the tokenizer of {model} needs custom code shipped with the model (tokenizer_config.json:"
        f" auto_map AutoTokenizer -> tokenization_evil.EvilTokenizer), and jaxsft never executes such code "
        f"(trust_remote_code is not honoured); use a model whose tokenizer transformers provides (a tokenizer.json "
        f"and a built-in tokenizer_class)")


def test_pickled_weights_are_refused_by_the_loader_too(tmp_path):
    from jaxsft.model.hf import load_hf_config, load_hf_params

    model = _model_copy(tmp_path, drop=("model.safetensors",), add={"pytorch_model.bin": "pickle"})
    with pytest.raises(MissingPath, match=r"no \*\.safetensors in .*pytorch_model\.bin: pickled PyTorch weights are "
                                          r"not loaded \(unpickling runs code\)"):
        load_hf_params(model, load_hf_config(model))


@pytest.mark.parametrize("file_name, message", [
    ("../secret.json", "dataset 'chat': path '../secret.json' escapes dataset_dir ({dir}); '..' is not allowed in "
                       "dataset_info.json. Put an absolute path in your own config instead."),
    ("{outside}", "dataset 'chat': absolute path '{outside}' in dataset_info.json; registry paths are relative to "
                  "dataset_dir ({dir}). Put an absolute path in your own config instead."),
])
def test_registry_paths_cannot_escape_dataset_dir(tmp_path, file_name, message):
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps([OK]))
    directory = _registry(tmp_path, {"chat": {"file_name": file_name.format(outside=outside)}})
    with pytest.raises(InputError) as e:
        validate_run(_config(tmp_path, dataset="chat", dataset_dir=str(directory)), devices=False)
    assert str(e.value) == message.format(dir=directory, outside=outside)
    # the user's own config may name that absolute path
    data = build_datasets(_args(outside, directory), AutoTokenizer.from_pretrained(str(TOKENIZER)))
    assert data.stats["train_examples"] == 1


@pytest.mark.parametrize("name", ["a.json", "a.jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, name):
    """Windows editors start UTF-8 files with a BOM; the rows read the same as without it."""
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    rows = [OK, {"instruction": "second", "input": "", "output": "two"}]
    text = json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    plain.mkdir(), marked.mkdir()
    (plain / name).write_text(text)
    (marked / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    expected = build_datasets(_args(plain / name, plain), tokenizer).train
    got = build_datasets(_args(marked / name, marked), tokenizer).train
    assert len(got) == 2 and all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(got, expected))
