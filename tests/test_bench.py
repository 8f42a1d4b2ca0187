"""tools/bench.py runs the real train step on the tiny example and prints one JSON line of the documented
fields. Performance is measured (BENCHMARKS.md), never asserted here."""

import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_device_env() -> dict:
    """conftest gives the test process 8 CPU devices; a subprocess inherits them unless told otherwise."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return env


def run_bench(*args, one_device=False):
    env = one_device_env() if one_device else dict(os.environ)
    proc = subprocess.run([sys.executable, "tools/bench.py", "--config", "configs/quickstart_full.yaml", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_bench_prints_one_json_line_of_measurements():
    r = run_bench("--steps", "2", "--warmup", "1", "finetuning_type=lora", "cutoff_len=128", one_device=True)
    for key in ("step_time_s", "step_time_min_s", "tokens_per_s", "label_tokens_per_s", "compile_s",
                "first_step_s", "tokens_per_step", "label_tokens_per_step", "fill"):
        assert isinstance(r[key], float) and r[key] > 0, (key, r[key])
    assert r["label_tokens_per_s"] <= r["tokens_per_s"] and 0 < r["fill"] <= 1
    assert r["mfu"] is None and r["peak_flops_per_device"] is None  # CPU: peak unknown
    assert r["peak_device_memory_bytes"] is None  # the CPU backend reports no device memory
    assert isinstance(r["host_rss_bytes"], int) and r["host_rss_bytes"] > 0
    assert r["finite"] is True and r["steps"] == 2 and r["warmup"] == 1
    assert r["finetuning_type"] == "lora" and r["lora_rank"] == 8
    assert 0 < r["model"]["trainable_params"] < r["model"]["params"]
    assert r["model"]["layers"] == 2 and r["cutoff_len"] == 128 and r["per_device_train_batch_size"] == 2
    assert r["backend"] == "cpu" and r["devices"] == 1 and isinstance(r["jax_version"], str)


def test_bench_synthetic_random_init_on_8_devices_with_peak_flops_reports_mfu():
    r = run_bench("--steps", "2", "--warmup", "0", "--synthetic", "--random_init", "--layers", "1",
                  "--peak_flops", "1e12", "finetuning_type=full", "cutoff_len=128")
    assert r["devices"] == 8 and r["mesh"]["fsdp"] == 8
    assert r["model"]["layers"] == 1 and r["weights"] == "random_init" and r["data"] == "synthetic"
    assert r["fill"] == 1.0 and r["tokens_per_step"] == r["global_batch_rows"] * 128  # rows packed end to end
    assert isinstance(r["mfu"], float) and 0 < r["mfu"] < 1
    assert r["model"]["trainable_params"] == r["model"]["params"]


def test_bench_ab_interleaves_variants_and_prints_one_line_each():
    env = one_device_env()
    proc = subprocess.run([sys.executable, "tools/bench_ab.py", "--config", "configs/quickstart_full.yaml",
                           "--steps", "2", "--rounds", "2", "base", "finetuning_type=lora,remat_policy=none"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == ["base", "finetuning_type=lora,remat_policy=none"]
    assert all(r["steps"] == 4 and 0 < r["step_time_min_s"] <= r["step_time_median_s"] for r in rows)
    assert rows[0]["vs_first"] == 1.0 and rows[1]["vs_first"] > 0


def test_bench_data_reports_examples_per_second_and_the_cost_of_each_stage(capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import bench_data

    bench_data.main(["--config", "configs/quickstart_full.yaml", "--cutoffs", "256", "--repeat", "1", "--split"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["examples"] > 50 and record["examples_per_s"] > 0 and record["workers"] == 1
    split = record["split_s"]
    assert list(split) == ["read", "convert", "tokenize", "mask", "pack", "save_tokenized_path", "save_cache"]
    assert all(v >= 0 for v in split.values()) and split["tokenize"] > 0


def test_bench_data_unique_copies_repeat_no_row(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import bench_data

    source = REPO.parent / "shared" / "data" / "llamafactory" / "alpaca_en_demo.json"
    overrides = bench_data.unique_copies(source, 3, tmp_path)
    rows = json.loads((tmp_path / "alpaca_en_demo_unique_x3.json").read_text())
    original = json.loads(source.read_text())
    assert len(rows) == 3 * len(original) and rows[:len(original)] == original
    distinct = {json.dumps(r, sort_keys=True) for r in rows}
    assert len(distinct) == 3 * len({json.dumps(r, sort_keys=True) for r in original})
    assert overrides == ["dataset=alpaca_en_demo_unique_x3", f"dataset_dir={tmp_path}"]


def test_bench_grouped_times_ragged_dot_and_the_blocked_matmul():
    sys.path.insert(0, str(REPO / "tools"))
    import bench_grouped

    out = StringIO()
    with redirect_stdout(out):
        assert bench_grouped.main(["--rows", "256", "--groups", "4", "--k", "16", "--n", "8", "--dtype", "float32",
                                   "--steps", "1"]) == 0
    row = json.loads(out.getvalue())
    assert row["backend"] == "cpu" and row["groups"] == 4
    assert row["ragged_dot_s"] > 0 and row["grouped_matmul_s"] > 0
