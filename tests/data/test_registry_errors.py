"""dataset_info.json mistakes through the CLI: a misspelled key or a column the data lacks is one `error:` line,
never a run on empty prompts."""

import json
from pathlib import Path

import pytest

from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny-llama"
ROWS = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(8)]


def _run(tmp_path, capsys, entry: dict, *extra, keep=False) -> str:
    """The last stderr line (or, with `keep`, all of stderr) of a CLI run that must fail, {data} for the folder."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.json").write_text(json.dumps(ROWS))
    (data / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "rows.json", **entry}}))
    capsys.readouterr()
    code = cli([f"model_name_or_path={TINY}", "dataset=chat", f"dataset_dir={data}", "template=llama3",
                "do_train=true", f"output_dir={tmp_path / 'out'}", "max_steps=1", "report_to=none", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return (err if keep else err.splitlines()[-1]).replace(str(data), "{data}")


@pytest.mark.parametrize("entry, message", [
    ({"columnz": {"prompt": "instruction"}},
     "dataset 'chat' in {data}/dataset_info.json: unknown key 'columnz', did you mean 'columns'?"),
    ({"columns": {"promt": "instruction"}},
     "dataset 'chat' in {data}/dataset_info.json, columns: unknown key 'promt', did you mean 'prompt'?"),
    ({"formatting": "sharegpt", "tags": {"role_tg": "from"}},
     "dataset 'chat' in {data}/dataset_info.json, tags: unknown key 'role_tg', did you mean 'role_tag'?"),
])
def test_a_misspelled_registry_key_is_an_error(tmp_path, capsys, entry, message):
    assert _run(tmp_path, capsys, entry, "--dry_run") == f"error: {message}"


def test_a_misspelled_file_name_is_named(tmp_path, capsys):
    """The entry's only source key misspelled: it said "has no source; jaxsft reads file_name ..."."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.json").write_text(json.dumps(ROWS))
    (data / "dataset_info.json").write_text(json.dumps({"chat": {"file_nmae": "rows.json"}}))
    code = cli([f"model_name_or_path={TINY}", "dataset=chat", f"dataset_dir={data}", "template=llama3",
                "do_train=true", f"output_dir={tmp_path / 'out'}", "max_steps=1", "report_to=none", "--dry_run"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1] == (
        f"error: dataset 'chat' in {data}/dataset_info.json: unknown key 'file_nmae', did you mean 'file_name'?")


def test_a_column_the_data_lacks_is_an_error(tmp_path, capsys):
    entry = {"columns": {"prompt": "instrucion", "query": "input", "response": "output"}}
    assert _run(tmp_path, capsys, entry) == (
        "error: dataset 'chat': columns.prompt names 'instrucion', which is not a column of {data}/rows.json (its "
        "columns: input, instruction, output). Did you mean 'instruction'? Fix dataset_info.json")



def test_an_absent_optional_column_is_named_in_a_warning(tmp_path, capsys):
    """A missing `system` column is read as empty (as a dataset without one), and said; the run goes on (here it
    stops at the next check, after the data is read)."""
    entry = {"columns": {"prompt": "instruction", "response": "output", "system": "sytem"}}
    assert _run(tmp_path, capsys, entry, "val_size=100", keep=True).endswith(
        "[jaxsft] WARNING dataset 'chat': columns.system names 'sytem', which is not a column of {data}/rows.json (its "
        "columns: input, instruction, output). It is read as empty\n"
        "error: val_size: 100 rows held out for evaluation, but the dataset has only 8; lower val_size (a count, or "
        "a fraction < 1)\n")
