"""tools/dump_dataset.py --out: examples in dataset order, packed rows with their segments."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CFG = str(REPO / "configs" / "quickstart_full.yaml")


def dump(tmp_path, *extra):
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "tools/dump_dataset.py", "--config", CFG, "--out", str(out), *extra,
                             "val_size=0", "do_eval=false"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_examples_then_packed_rows_hold_the_same_tokens(tmp_path):
    examples = dump(tmp_path)
    identity = json.loads((REPO / "examples" / "data" / "identity.json").read_text())
    assert len(examples) == len(identity)  # every row, in order
    assert all(len(e["input_ids"]) == len(e["labels"]) for e in examples)
    assert all(e["labels"][0] == -100 and any(x != -100 for x in e["labels"]) for e in examples)
    assert len(dump(tmp_path, "--limit", "7")) == 7

    rows = dump(tmp_path, "--packed")
    by_content = sorted(tuple(e["input_ids"]) for e in examples)
    unpacked, learned = [], 0
    for row in rows:
        assert len(row["input_ids"]) == 256
        for seg in range(1, max(row["segment_ids"]) + 1):
            at = [i for i, s in enumerate(row["segment_ids"]) if s == seg]
            assert [row["positions"][i] for i in at] == list(range(len(at)))
            unpacked.append(tuple(row["input_ids"][i] for i in at))
            learned += sum(row["labels"][i] != -100 for i in at)
    assert sorted(unpacked) == by_content  # each example exactly once
    assert learned == sum(sum(x != -100 for x in e["labels"]) for e in examples)


def test_weighted_data_dumps_its_weights(tmp_path):
    examples = dump(tmp_path, "dataset=weighted_chat")
    assert all(len(e["weights"]) == len(e["labels"]) for e in examples)
    assert all((w > 0) == (lab != -100) for e in examples for w, lab in zip(e["weights"], e["labels"]))
    assert {0.25, 0.5, 1.0, 1.5, 2.0} <= {w for e in examples for w in e["weights"]}
    rows = dump(tmp_path, "dataset=weighted_chat", "--packed")
    assert sorted(w for r in rows for w in r["weights"] if w) == sorted(w for e in examples for w in e["weights"] if w)
