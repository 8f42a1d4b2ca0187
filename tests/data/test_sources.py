"""Finding and reading datasets: the registry, local files of every type, clear errors."""

import json

import datasets
import pytest

from jaxsft.data.args import DataArgs
from jaxsft.data.formats import to_conversation
from jaxsft.data.pipeline import build_datasets
from jaxsft.data.sources import load_rows, resolve

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact."},
]


def test_registry_entries_resolve_with_their_columns(data_dir):
    alpaca, glaive = resolve("alpaca_en_demo, glaive_toolcall_en_demo", str(data_dir))
    assert alpaca.formatting == "alpaca" and alpaca.path == str(data_dir / "alpaca_en_demo.json")
    assert glaive.formatting == "sharegpt" and glaive.messages == "conversations" and glaive.tools == "tools"
    assert len(load_rows(alpaca)) == 999 and len(load_rows(alpaca, max_samples=10)) == 10


def test_registry_entry_without_its_file_is_a_clear_error(data_dir):
    with pytest.raises(FileNotFoundError) as e:
        resolve("alpaca_zh_demo", str(data_dir))
    msg = str(e.value)
    assert msg.startswith(f"dataset 'alpaca_zh_demo' in {data_dir / 'dataset_info.json'} names 'alpaca_zh_demo.json', "
                          f"which is not in {data_dir}.")
    assert "alpaca_en_demo, glaive_toolcall_en_demo, identity" in msg


def test_unknown_name_suggests_close_ones(data_dir):
    with pytest.raises(ValueError, match=r"Unknown dataset 'alpaca_en_dem'.*Did you mean alpaca_en_demo"):
        resolve("alpaca_en_dem", str(data_dir))


def test_registry_paths_cannot_escape_dataset_dir(tmp_path):
    (tmp_path / "secret.json").write_text(json.dumps(ROWS))
    inner = tmp_path / "data"
    inner.mkdir()
    (inner / "dataset_info.json").write_text(json.dumps({
        "up": {"file_name": "../secret.json"}, "abs": {"file_name": str(tmp_path / "secret.json")}}))
    with pytest.raises(ValueError, match=r"dataset 'up': path '../secret.json' escapes dataset_dir"):
        resolve("up", str(inner))
    with pytest.raises(ValueError, match=r"dataset 'abs': absolute path .* registry paths are relative"):
        resolve("abs", str(inner))
    # the user's own config may name an absolute path
    (attr,) = resolve(str(tmp_path / "secret.json"), str(inner))
    assert attr.formatting == "alpaca" and len(load_rows(attr)) == 2


def test_symlinked_data_files_inside_dataset_dir_train(tmp_path, new_tokenizer):
    """A registry file that is a symlink to elsewhere (a file, or a folder of files) is read, as LLaMA-Factory
    reads it; only the registry's own path text is checked ('..' and absolute paths stay refused, above)."""
    elsewhere = tmp_path / "big_disk"
    (elsewhere / "shards").mkdir(parents=True)
    (elsewhere / "rows.json").write_text(json.dumps(ROWS))
    (elsewhere / "shards" / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    inner = tmp_path / "data"
    inner.mkdir()
    (inner / "linked.json").symlink_to(elsewhere / "rows.json")
    (inner / "linked_dir").symlink_to(elsewhere / "shards", target_is_directory=True)
    (inner / "dataset_info.json").write_text(json.dumps({
        "linked": {"file_name": "linked.json"}, "folder": {"file_name": "linked_dir"},
        "through": {"file_name": "linked_dir/../../secret.json"}}))
    data = build_datasets(DataArgs(dataset="linked,folder", dataset_dir=str(inner), template="qwen",
                                   cutoff_len=64), new_tokenizer())
    assert data.stats["train_examples"] == 4 and data.stats["train_dropped"] == 0
    with pytest.raises(ValueError, match=r"dataset 'through': path 'linked_dir/../../secret.json' escapes "):
        resolve("through", str(inner))


def _write_all_types(tmp_path):
    ds = datasets.Dataset.from_list([dict(r, system=r.get("system")) for r in ROWS])
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds.to_csv(str(tmp_path / "rows.csv"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "arrow").mkdir()
    arrow.rename(tmp_path / "arrow" / "rows.arrow")
    ds.save_to_disk(str(tmp_path / "saved"))
    return ["rows.json", "rows.jsonl", "rows.csv", "rows.parquet", "arrow", "saved"]


def test_every_file_type_gives_the_same_conversations(tmp_path):
    names = _write_all_types(tmp_path)
    results = {}
    for name in names:
        (attr,) = resolve(name, str(tmp_path))
        rows = load_rows(attr)
        results[name] = [to_conversation(rows[i], attr, attr.path, i) for i in range(len(rows))]
    expected = results["rows.json"]
    assert expected[1].system == "Be exact." and expected[1].messages[0].content == "Add\n2 and 3"
    for name in names:
        assert [(c.system, c.messages) for c in results[name]] == [(c.system, c.messages) for c in expected], name


def test_columns_and_tags_remap(tmp_path):
    rows = [{"q": "What?", "a": "That.", "sys": "S", "hist": [["h1", "a1"]]},
            {"chat": [{"who": "me", "text": "yo"}, {"who": "bot", "text": "hey"}]}]
    (tmp_path / "a.json").write_text(json.dumps(rows[:1]))
    (tmp_path / "s.json").write_text(json.dumps(rows[1:]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "a": {"file_name": "a.json", "columns": {"prompt": "q", "response": "a", "system": "sys", "history": "hist"}},
        "s": {"file_name": "s.json", "formatting": "sharegpt", "columns": {"messages": "chat"},
              "tags": {"role_tag": "who", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
    }))
    a, s = resolve("a,s", str(tmp_path))
    conv = to_conversation(load_rows(a)[0], a, a.path, 0)
    assert conv.system == "S"
    assert [(m.role, m.content) for m in conv.messages] == [("user", "h1"), ("assistant", "a1"), ("user", "What?"),
                                                           ("assistant", "That.")]
    conv = to_conversation(load_rows(s)[0], s, s.path, 0)
    assert [(m.role, m.content) for m in conv.messages] == [("user", "yo"), ("assistant", "hey")]


def test_openai_style_messages_file(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A"}]}]
    (tmp_path / "m.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (attr,) = resolve(str(tmp_path / "m.jsonl"), str(tmp_path))
    conv = to_conversation(load_rows(attr)[0], attr, attr.path, 0)
    assert conv.system == "Sys" and [(m.role, m.content) for m in conv.messages] == [("user", "Q"), ("assistant", "A")]


def test_val_size_count_and_eval_dataset(data_dir, new_tokenizer):
    base = dict(dataset_dir=str(data_dir), template="qwen", cutoff_len=128)
    data = build_datasets(DataArgs(dataset="identity", val_size=11, **base), new_tokenizer())
    assert len(data.eval) == 11 and len(data.train) == 80
    data = build_datasets(DataArgs(dataset="identity", eval_dataset="glaive_toolcall_en_demo",
                                   max_samples=5, **base), new_tokenizer())
    assert len(data.train) == 5 and len(data.eval) == 5
    with pytest.raises(ValueError, match="either val_size or eval_dataset"):
        build_datasets(DataArgs(dataset="identity", eval_dataset="identity", val_size=0.1, **base),
                                new_tokenizer())
