"""tools/dump_dataset.py shows the learned part of each example."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dump_shows_labels_decoded(data_dir, capsys):
    spec = importlib.util.spec_from_file_location("dump_dataset", REPO / "tools" / "dump_dataset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--model_name_or_path", str(REPO / "tests" / "fixtures" / "data" / "tokenizer"), "--dataset",
               "identity", "--dataset_dir", str(data_dir), "--template", "llama3", "--cutoff_len", "64", "-n", "1"])
    out = capsys.readouterr().out
    learned = out.split("--- learned (labels decoded):\n")[1].split("\n--- ids")[0]
    assert learned == ("Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?"
                       "<|eot_id|>")  # identity.json row 0's output, then llama3's end of turn
    assert "train_examples: 91" in out
