"""Two local processes (4 simulated CPU devices each, jax.distributed over gloo) train exactly like one
process with 8 devices, and a checkpoint the two wrote resumes in one."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_logs import train_losses

REPO = Path(__file__).resolve().parents[1]
ARGS = ["configs/quickstart_full.yaml", "max_steps=6", "save_steps=3", "logging_steps=1", "do_eval=false",
        "report_to=none", "plot_loss=false", "per_device_train_batch_size=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def run(*extra, devices=8):
    result = subprocess.run([sys.executable, "-m", "jaxsft.main", *ARGS, *extra], cwd=REPO, env=env(devices),
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_match_one_and_resume_in_one(tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "jaxsft.main", *ARGS, f"output_dir={two}",
                               f"coordinator_address=localhost:{port}", "num_processes=2", f"process_id={i}"],
                              cwd=REPO, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    # tokenization is split: process 0 tokenized the first block of the rows, not all of them
    block = re.search(r"process 0 of 2 tokenizes rows 0-(\d+) of (\d+);", outputs[0])
    assert block and 0 < int(block[1]) < int(block[2]), outputs[0][-3000:]
    run(f"output_dir={one}")

    reference = train_losses(one)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert train_losses(two) == reference  # logged at 4 decimals: identical
    assert reference[6] < reference[1]
    assert sorted(p.name for p in two.glob("checkpoint_*")) == ["checkpoint_3", "checkpoint_6"]

    result = run(f"output_dir={resumed}", f"resume_from_checkpoint={two / 'checkpoint_3'}")
    assert "at step 3" in result.stdout
    after = train_losses(resumed)  # steps 1-3 from the source run's log, 4-6 trained after the resume
    assert after == reference


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path, sig):
    """A preemption notice (or Ctrl-C) reaching one host: all hosts agree on a step, save together, exit
    128 + signal (unfinished, nothing lost).
    A SIGINT stopped that process alone: the other waited for it in the next collective forever."""
    out = tmp_path / "pre"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "jaxsft.main", *ARGS, "max_steps=400", "save_steps=1000",
                               f"output_dir={out}", f"coordinator_address=localhost:{port}", "num_processes=2",
                               f"process_id={i}"],
                              cwd=REPO, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    log = out / "trainer_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    procs[1].send_signal(sig)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    stops = []
    for i, (p, output) in enumerate(zip(procs, outputs)):
        said = int(sig) if i == 1 else int(signal.SIGTERM)  # the other host learns of it as a preemption
        assert p.returncode == 128 + said, output[-3000:]
        match = re.search(rf"stopped by signal {said} after step (\d+); checkpoint saved", output)
        assert match, output[-3000:]
        stops.append(int(match.group(1)))
    assert stops[0] == stops[1] < 400
    assert [p.name for p in out.glob("checkpoint_*")] == [f"checkpoint_{stops[0]}"]
