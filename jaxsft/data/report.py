"""The data report of an `audit.Audit`: `data_report.html` (one self-contained page: inline CSS, inline SVG
histograms, no scripts, opens from disk) and the same summary as terminal text."""

from __future__ import annotations

import html
import io
import textwrap
from pathlib import Path

import numpy as np

from jaxsft.data.audit import Audit, Fill, Sample, SplitAudit, learned_mask, plural
from jaxsft.data.formats import row_place

REPORT_NAME = "data_report.html"
TERMINAL_DROPPED = 20  # dropped rows listed in the terminal (the page lists them all)
TERMINAL_TRUNCATED = 5
SECTIONS = ("findings", "counts", "dropped", "histograms", "fill", "template", "examples")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;
 padding:16px 24px;color:#1d2430;background:#fff}
h1{font-size:22px;margin:4px 0} h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:3px}
.settings{color:#556;font-size:12.5px} code{background:#f1f3f7;padding:0 3px;border-radius:3px}
.box{border-radius:6px;padding:8px 12px;margin:6px 0;border:1px solid}
.error{background:#fdecec;border-color:#e25555} .warning{background:#fff6e0;border-color:#e0a800}
.note{background:#f3f5f8;border-color:#c5ccd6} .ok{background:#eaf7ee;border-color:#4caf6a}
.box b{display:block} table{border-collapse:collapse;margin:4px 0 8px} td,th{padding:3px 10px;text-align:right;
 border-bottom:1px solid #eceff3} th{background:#f6f7f9} td.l,th.l{text-align:left}
.hist{display:flex;flex-wrap:wrap;gap:12px} .hist figure{margin:0} figcaption{font-size:12.5px;color:#556}
.ex{border:1px solid #dde2ea;border-radius:6px;margin:10px 0;overflow:hidden}
.ex header{background:#f6f7f9;padding:4px 10px;font-size:12.5px;color:#334}
.tok{font:12.5px/1.6 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
 word-break:break-all;padding:8px 10px;margin:0}
.t{border-right:1px solid #e3e6ec} .L{background:#c9efd2} .L:nth-child(even){background:#b6e6c2}
.S{color:#7a5ab5;font-weight:600} .Z{background:#eadcf5;text-decoration:line-through}
.w{font-size:10px;color:#fff;background:#3f7d4f;border-radius:3px;padding:0 3px;margin:0 2px;vertical-align:super}
.legend span{margin-right:14px} .nl{color:#9aa3b0}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def count_rows(split: SplitAudit) -> list[tuple[str, str]]:
    """(label, value) rows of a split's counts; shared by the page and the terminal."""
    c = split.counts
    tokens, learned = int(split.lengths.sum()), int(split.learned.sum())
    rows = [("rows read", f"{c.rows}"), ("examples kept", f"{c.examples}"),
            ("rows dropped", f"{c.dropped}"),
            ("examples truncated (tokens lost)", f"{c.truncated} ({c.truncated_tokens} tokens)"),
            ("tokens", f"{tokens}"), ("learned tokens (label share)", f"{learned} ({_pct(learned, tokens)})"),
            ("prompt tokens learned", f"{c.prompt_label_tokens}"),
            ("duplicate examples (same tokens as an earlier one)", f"{split.duplicates}")]
    if split.weight_sum is not None:
        rows.append(("learned tokens, weighted (sum of loss weights)", f"{split.weight_sum:.6g}"))
        per_weight = ", ".join(f"{w:g}: {n}" for w, n in split.weight_tokens.items())
        rows.append(("learned tokens per loss weight", per_weight))
    for name, values in (("example length", split.lengths), ("learned per example", split.learned)):
        if len(values):
            rows.append((f"{name} min / median / max", f"{values.min()} / {int(np.median(values))} / {values.max()}"))
    return rows


def fill_rows(fill: Fill) -> list[tuple[str, str]]:
    empty = fill.batches * fill.batch_rows - fill.rows
    rows = [("global batch", f"{fill.batch_rows} rows"),
            ("rows per epoch", f"{fill.rows} {'packed rows' if fill.packing else 'examples'}, {fill.batches} "
                               f"batches" + (f" (the last one filled up with {plural(empty, 'empty row')})"
                                             if empty else ""))]
    if fill.packing:
        rows.append(("packing fill (tokens / rows x cutoff_len)", f"{100 * fill.knapsack:.1f}%"))
    if fill.replay_tokens:
        rows.append(("replay share (replay tokens / tokens)", f"{_pct(fill.replay_tokens, fill.tokens)}"))
    rows.append(("batch fill (tokens / padded positions)", f"{100 * fill.fill:.1f}%"))
    rows.append(("padding share", f"{100 * (1 - fill.fill):.1f}%" if fill.positions else "n/a"))
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><td class=l>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def svg_histogram(values: np.ndarray, xlabel: str, marker: float | None = None, marker_label: str = "") -> str:
    """An inline SVG histogram (matplotlib, text kept as text)."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):
        fig = Figure(figsize=(4.6, 2.4), dpi=100)
        FigureCanvasSVG(fig)
        ax = fig.add_subplot()
        values = np.asarray(values)
        if len(values):  # integer counts: at most 40 bins, none narrower than 1
            bins = min(40, len(np.histogram_bin_edges(values, "auto")) - 1, int(values.max() - values.min()) + 1)
            ax.hist(values, bins=max(bins, 1), color="#4c8bd6", edgecolor="white", linewidth=0.4)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if marker is not None:
            ax.axvline(marker, color="#d9534f", linestyle="--", linewidth=1)
            ax.text(marker, ax.get_ylim()[1] * 0.95, f" {marker_label}", color="#d9534f", ha="right", va="top")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("examples")
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _token_html(sample: Sample) -> str:
    """Each token its own span: learned ones highlighted, special tokens marked, weights shown where they change."""
    mask = learned_mask(sample.labels)
    weights = None if sample.weights is None else np.asarray(sample.weights, np.float64)
    out, last_w = [], None
    for start, end, text in sample.pieces:
        learned = bool(mask[start:end].any())
        classes = ["t"]
        if learned:
            classes.append("L")
        if any(int(t) in sample.special for t in sample.ids[start:end]):
            classes.append("S")
        title = f"token {start}: id {int(sample.ids[start])}" + (", learned" if learned else "")
        if learned and int(sample.labels[start]) != int(sample.ids[start]):
            title += f" as target id {int(sample.labels[start])}"  # efficient_eos: the answer's EOS
        badge = ""
        if weights is not None and learned:
            w = float(weights[start:end][mask[start:end]][0])
            title += f", weight {w:g}"
            if w == 0:
                classes.append("Z")
            if w != last_w:
                badge = f"<span class=w>w={w:g}</span>"
            last_w = w
        elif not learned:
            last_w = None
        shown = _esc(text).replace("\n", "<span class=nl>\u21b5</span>\n")
        out.append(f"{badge}<span class=\"{' '.join(classes)}\" title=\"{_esc(title)}\">{shown}</span>")
    return "".join(out)


def _example_html(k: int, sample: Sample, title: str | None = None) -> str:
    n_learned = int(learned_mask(sample.labels).sum())
    where = row_place(*sample.origin) if sample.origin else ""
    head = title or f"example {k}" + (" (dropped: learns nothing)" if not sample.kept else "")
    weights = "" if sample.weights is None else ", per-token weights"
    return (f"<div class=ex><header><b>{_esc(head)}</b> {_esc(where)} &middot; {len(sample.ids)} tokens, "
            f"{n_learned} learned{weights}</header><pre class=tok>{_token_html(sample)}</pre></div>")


def _dropped_html(split: SplitAudit) -> str:
    c = split.counts
    if not c.dropped:
        return f"<p>{split.name}: no rows dropped.</p>"
    listed = "".join(f"<tr><td class=l>{_esc(f)}</td><td>{r + 1}</td><td class=l>{_esc(reason)}</td></tr>"
                     for f, r, reason in c.dropped_rows)
    more = (f"<p>{c.dropped - len(c.dropped_rows)} more dropped rows are not listed.</p>"
            if c.dropped > len(c.dropped_rows) else "")
    return (f"<p>{split.name}: {c.dropped} of {c.rows} rows dropped (rows count from 1, as lines do).</p>"
            f"<table><tr><th class=l>file</th><th>row</th><th class=l>reason</th></tr>{listed}</table>{more}")


def _truncated_html(split: SplitAudit, cutoff: int) -> str:
    c = split.counts
    if not c.truncated_rows:
        return ""
    listed = "".join(f"<tr><td class=l>{_esc(f)}</td><td>{r + 1}</td><td>{full}</td><td>{full - kept}</td></tr>"
                     for f, r, full, kept in c.truncated_rows)
    more = (f"<p>{c.truncated - len(c.truncated_rows)} more truncated examples are not listed.</p>"
            if c.truncated > len(c.truncated_rows) else "")
    return (f"<details><summary>{split.name}: {plural(c.truncated, 'example')} truncated to cutoff_len={cutoff} "
            f"({c.truncated_tokens} tokens cut)</summary><table><tr><th class=l>file</th><th>row</th>"
            f"<th>tokens</th><th>cut</th></tr>{listed}</table>{more}</details>")


def render_html(audit: Audit) -> str:
    s = audit.settings
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>jaxsft data report</title>"
             f"<style>{CSS}</style></head><body><h1>jaxsft data report</h1>",
             "<p class=settings>" + " &middot; ".join(f"{_esc(k)}: <code>{_esc(v)}</code>" for k, v in s.items()
                                                        if v is not None) + "</p>",
             "<section id=findings><h2>Findings</h2>"]
    if audit.findings:
        parts += [f"<div class='box {f.level}'><b>{_esc(f.level.upper())}: {_esc(f.title)}</b>{_esc(f.detail)}</div>"
                  for f in audit.findings]
    else:
        parts.append("<div class='box ok'><b>No problems found</b>Examples learn their answers and no prompt "
                     "text.</div>")
    parts.append("</section><section id=counts><h2>Counts</h2>")
    columns = [dict(count_rows(split)) for split in audit.splits]
    names = list(dict.fromkeys(k for c in columns for k in c))
    parts.append("<table><tr><th></th>" + "".join(f"<th>{_esc(split.name)}</th>" for split in audit.splits) + "</tr>")
    for n in names:
        parts.append(f"<tr><td class=l>{_esc(n)}</td>" + "".join(f"<td>{_esc(c.get(n, ''))}</td>" for c in columns)
                     + "</tr>")
    parts.append("</table>")
    parts.append("</section><section id=dropped><h2>Dropped and truncated rows</h2>")
    parts += [_dropped_html(split) + _truncated_html(split, s.get("cutoff_len")) for split in audit.splits]
    parts.append("</section><section id=histograms><h2>Histograms</h2>")
    for split in audit.splits:
        if len(split.lengths) and split.name in ("train", "eval"):
            cutoff = s.get("cutoff_len")
            parts.append(f"<h3>{_esc(split.name)}</h3><div class=hist>"
                         f"<figure>{svg_histogram(split.lengths, 'tokens per example', cutoff, 'cutoff_len')}"
                         f"<figcaption>example length</figcaption></figure>"
                         f"<figure>{svg_histogram(split.learned, 'learned tokens per example')}"
                         f"<figcaption>learned tokens per example</figcaption></figure></div>")
    parts.append("</section><section id=fill><h2>Batch fill</h2>")
    if audit.fill is not None:
        f = audit.fill
        parts.append(_table(fill_rows(f)))
        parts.append("<table><tr><th>padded to</th><th>batches</th><th>tokens</th><th>positions</th><th>fill</th></tr>"
                     + "".join(f"<tr><td>{w}</td><td>{n}</td><td>{t}</td><td>{p}</td><td>{_pct(t, p)}</td></tr>"
                               for w, n, t, p in f.buckets) + "</table>")
    else:
        parts.append("<p>No training split.</p>")
    parts.append("</section><section id=template><h2>Template check</h2><p>A probe conversation (system, two user "
                 "and two assistant turns) encoded as training encodes it; only the answers and the tokens that "
                 "close them should be learned.</p>")
    if audit.probe is not None:
        parts.append(_example_html(0, audit.probe, f"probe, template {s.get('template')}"))
    parts.append("</section><section id=examples><h2>Examples</h2><p class=legend><span class='t L'>learned</span>"
                 "<span class=t>not learned</span><span class='t S'>special token</span>"
                 "<span class=w>w=</span>loss weight (when the data has weights). Hover a token for its id.</p>")
    parts += [_example_html(k, sample) for k, sample in enumerate(audit.samples)]
    parts.append("</section></body></html>\n")
    return "".join(parts)


def render_text(audit: Audit, out_path: str | None = None) -> str:
    lines = []
    if audit.findings:
        width = 78
        lines.append("+" + "-" * width + "+")
        for f in audit.findings:
            lines += [f"| {line}".ljust(width + 1) + "|" for line in textwrap.wrap(f"{f.level.upper()}: {f.title}",
                                                                                   width - 2)]
            lines += [f"|   {line}".ljust(width + 1) + "|" for line in textwrap.wrap(f.detail, width - 4)]
        lines.append("+" + "-" * width + "+")
    else:
        lines.append("no problems found: examples learn their answers and no prompt text")
    for split in audit.splits:
        lines.append(f"== {split.name}")
        lines += [f"  {k}: {v}" for k, v in count_rows(split)]
        for f, r, reason in split.counts.dropped_rows[:TERMINAL_DROPPED]:
            lines.append(f"  dropped: {reason}" if f and f in reason else f"  dropped: {row_place(f, r)}: {reason}")
        if split.counts.dropped > TERMINAL_DROPPED:
            lines.append(f"  ... {split.counts.dropped - TERMINAL_DROPPED} more dropped rows (all in the report)")
        for f, r, full, kept in split.counts.truncated_rows[:TERMINAL_TRUNCATED]:
            lines.append(f"  truncated: {row_place(f, r)}: {full} tokens, {full - kept} cut")
        if split.counts.truncated > TERMINAL_TRUNCATED:
            lines.append(f"  ... {split.counts.truncated - TERMINAL_TRUNCATED} more truncated examples (in the report)")
    if audit.fill is not None:
        lines.append("== batches (epoch 0)")
        lines += [f"  {k}: {v}" for k, v in fill_rows(audit.fill)]
    if out_path:
        lines.append(f"report: {out_path}")
    return "\n".join(lines)


def write_report(audit: Audit, out_dir: str | Path) -> Path:
    path = Path(out_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(audit), encoding="utf-8")
    return path
