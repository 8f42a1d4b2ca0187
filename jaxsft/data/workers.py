"""`preprocessing_num_workers`: encode slices of rows in child processes that import only the data code.

Each worker is `python -m jaxsft.data.workers`, fed one pickled job on stdin (its rows, the template, the
tokenizer, the data args) and answering one pickled result on stdout: `(ids, labels, lengths)` as three
flat arrays and the slice's `Counts`, or the exception it raised (re-raised here, so a bad row names its
file, row and field as in one process). Not multiprocessing's spawn: that re-imports the parent's main
module (for `python -m jaxsft.main`: JAX, transformers, the model code), which cost each worker seconds
before it encoded a row. Every worker gets an equal share of the cores for the Rust tokenizer's threads
(`RAYON_NUM_THREADS`), so N workers do not run N x cores threads.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jaxsft.data.packing import WeightedExample, is_weighted, weights_of

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def run(jobs: list[tuple[Any, ...]], threads: int) -> list[Any]:
    """`_work(*job)` for each job, each in its own worker process, results in order."""
    env = {**os.environ, "RAYON_NUM_THREADS": str(max(1, threads)),
           "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}

    def one(job) -> Any:
        proc = subprocess.Popen([sys.executable, "-m", "jaxsft.data.workers"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env)
        out, _ = proc.communicate(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
        if not out:
            raise RuntimeError(f"a preprocessing worker exited with code {proc.returncode} and no result "
                               "(its error is printed above)")
        ok, value = pickle.loads(out)
        if not ok:
            raise value
        return value

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def flatten(examples: list) -> tuple:
    """(all ids, all labels, lengths[, all weights, which examples carry weights]): arrays that pickle in one
    piece each; the weights only when some example carries loss weights."""
    lengths = np.fromiter((len(ids) for ids, _ in examples), np.int64, len(examples))
    if not examples:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), lengths
    flat = (np.concatenate([ids for ids, _ in examples]), np.concatenate([labels for _, labels in examples]),
            lengths)
    if not is_weighted(examples):
        return flat
    return (*flat, np.concatenate([weights_of(e) for e in examples]),
            np.array([getattr(e, "weights", None) is not None for e in examples]))


def unflatten(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None = None,
              weighted: np.ndarray | None = None) -> list:
    if not len(lengths):
        return []
    cuts = np.cumsum(lengths)[:-1]
    pairs = list(zip(np.split(ids, cuts), np.split(labels, cuts)))
    if weights is None:
        return pairs
    return [WeightedExample(*pair, w) if flag else pair
            for pair, w, flag in zip(pairs, np.split(weights, cuts), weighted)]


def _work(rows, template, tokenizer, args):
    from jaxsft.data.encode import encode_list

    examples, counts = encode_list(rows, template, tokenizer, args)
    return flatten(examples), counts


def _main() -> None:
    out = os.fdopen(os.dup(1), "wb")  # the result's pipe; anything else printed, by Python or a C library,
    os.dup2(2, 1)  # goes to stderr
    sys.stdout = sys.stderr
    job = pickle.load(sys.stdin.buffer)
    try:
        result = (True, _work(*job))
    except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
        try:
            pickle.dumps(e)
            result = (False, e)
        except Exception:  # noqa: BLE001 - an error that cannot cross: its text does
            result = (False, RuntimeError(f"{type(e).__name__}: {e}"))
    out.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    out.flush()


if __name__ == "__main__":
    _main()
