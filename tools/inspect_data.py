"""The data report: the data as training reads it, checked, as text and as `data_report.html` (= `jaxsft inspect`).

    python tools/inspect_data.py --config cfg.yaml [--out DIR] [--examples N] [key=value ...]
    python tools/inspect_data.py --config cfg.yaml --screenshot docs/img/data_report.png [--size 1100x1500]

Writes `data_report.html` into `--out` (default: the config's output_dir): counts (rows read, examples kept,
dropped rows with file, row and reason, truncation), the share of tokens learned, histograms of example length
and learned tokens, batch fill (packing, or padding to the length buckets), a template probe and the first N
examples (default 10) with learned tokens highlighted (and per-token weights, when the data has them).
Templates that learn nothing or learn prompt text are flagged at the top, and in the terminal.
`--screenshot PNG` also renders the page in headless Chromium and fails if the page logs to its console.
See jaxsft/data/audit.py (what is measured and checked) and jaxsft/data/report.py (the page).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxsft.main import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(["inspect", *sys.argv[1:]]))
