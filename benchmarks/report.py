"""Tables of benchmark rows (plain text or Markdown) and their summaries."""

import dataclasses

from .shapes import SHAPE_SETS
from .timing import geomean


@dataclasses.dataclass(frozen=True)
class Column:
    key: str
    header: str
    format: object = "{}"  # a format string, or a function of the value
    text: bool = False  # left-aligned

    def cell(self, row):
        if self.key not in row:
            return ""
        value = row[self.key]
        return self.format(value) if callable(self.format) else self.format.format(value)


def shape_text(shape):
    return ",".join(map(str, shape))


def flags(row):
    """Marks a reader should not miss: fused_bn slower than eager, ratios from noise or
    from a busy machine, a compile baseline that did not compile."""
    marks = []
    for key, mark in (("speedup_vs_eager", "SLOWER"), ("noisy", "noisy"), ("busy", "busy")):
        for prefix, suffix in (("", ""), ("tuned_", "(tuned)")):
            value = row.get(prefix + key)
            if value is not None and (value < 1 if key == "speedup_vs_eager" else value):
                marks.append(mark + suffix)
    if "compile_error" in row:
        marks.append("compile fell back")
    return " ".join(marks)


MAIN_COLUMNS = [
    Column("op", "op", text=True),
    Column("shape", "shape", shape_text),
    Column("dtype", "dtype"),
    Column("layout", "layout"),
    Column("fused_ms", "fused ms", "{:.3f}"),
    Column("eager_ms", "eager ms", "{:.3f}"),
    Column("compile_ms", "compile ms", "{:.3f}"),
    Column("speedup_vs_eager", "vs eager", "{:.2f}x"),
    Column("speedup_vs_compile", "vs compile", "{:.2f}x"),
    Column("tuned_speedup_vs_eager", "tuned malloc: vs eager", "{:.2f}x"),
    Column("flags", "flags", text=True),
]
VERBOSE_COLUMNS = MAIN_COLUMNS[:-1] + [
    Column("device", "device"),
    Column("spread_vs_eager", "spread", "{:.0%}"),
    Column("others_cpus", "others' CPUs", "{:.2f}"),
    Column("copy_ms", "copy ms", "{:.3f}"),
    Column("fused_GBps", "GB/s", "{:.1f}"),
    Column("pct_of_copy_bw", "% copy BW", "{:.0f}%"),
    Column("memory_GBps", "mem GB/s", "{:.1f}"),
    Column("pct_of_memory_bw", "% mem BW", "{:.0f}%"),
    Column("floor_speedup_vs_eager", "floor vs eager", "{:.2f}x"),
    Column("saved_fused_MB", "saved MB fused", "{:.1f}"),
    Column("saved_eager_MB", "saved MB eager", "{:.1f}"),
    Column("faults_fused", "faults fused", "{:.0f}"),
    Column("faults_eager", "faults eager", "{:.0f}"),
    Column("tuned_faults_fused", "tuned: faults fused", "{:.0f}"),
    Column("tuned_faults_eager", "tuned: faults eager", "{:.0f}"),
    Column("compile_s", "compile s", "{:.1f}"),
    MAIN_COLUMNS[-1],
]


def row_table(rows, columns, markdown=False):
    """Benchmark rows as a table, with their flags."""
    return table([{**row, "flags": flags(row)} for row in rows], columns, markdown)


def table(rows, columns, markdown=False):
    """Rows as a table; columns that no row has are left out."""
    columns = [c for c in columns if any(c.cell(row) for row in rows)]
    cells = [[c.cell(row) for c in columns] for row in rows]
    headers = [c.header for c in columns]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    return "\n".join("  ".join(cell.ljust(w) if c.text else cell.rjust(w)
                               for c, cell, w in zip(columns, line, widths)).rstrip()
                     for line in [headers, *cells])


def summarize(rows):
    """Per op (in order of first appearance) and over all rows: geometric mean, min and max
    of each speedup, mean minor page faults per call, rows slower than eager and noisy rows."""
    groups = {}
    for row in rows:
        groups.setdefault(row["op"], []).append(row)
    if len(groups) > 1:
        groups["all rows"] = rows
    return [_summary_row(op, group) for op, group in groups.items()]


def _summary_row(op, rows):
    def values(key):
        return [row[key] for row in rows if key in row]

    summary = {"op": op, "rows": len(rows),
               "slower": sum(row.get("speedup_vs_eager", 1) < 1 for row in rows),
               "noisy": sum(bool(row.get("noisy")) for row in rows),
               "busy": sum(bool(row.get("busy")) for row in rows)}
    for key in ("speedup_vs_eager", "speedup_vs_compile", "tuned_speedup_vs_eager"):
        if values(key):
            summary[key] = stats(values(key))
    for key in ("faults_fused", "faults_eager", "tuned_faults_fused", "tuned_faults_eager"):
        if values(key):
            summary[key] = sum(values(key)) / len(values(key))
    return summary


def stats(values):
    """Geometric mean, min and max of speedups."""
    return {"geomean": geomean(values), "min": min(values), "max": max(values),
            "rows": len(values)}


def stats_text(stats):
    return f"{stats['geomean']:.2f}x ({stats['min']:.2f}-{stats['max']:.2f})"


def _faults_text(fused, eager):
    return f"{fused:.0f} / {eager:.0f}"


SUMMARY_COLUMNS = [
    Column("op", "op", text=True),
    Column("rows", "rows"),
    Column("speedup_vs_eager", "vs eager: geomean (min-max)", stats_text),
    Column("speedup_vs_compile", "vs compile", stats_text),
    Column("tuned_speedup_vs_eager", "tuned malloc: vs eager", stats_text),
    Column("faults", "faults/call fused / eager"),
    Column("tuned_faults", "tuned: faults/call"),
    Column("slower", "slower rows"),
    Column("noisy", "noisy rows"),
    Column("busy", "busy rows"),
]


def summary_table(rows, markdown=False):
    summaries = summarize(rows)
    for s in summaries:
        for prefix in ("", "tuned_"):
            if f"{prefix}faults_fused" in s:
                s[f"{prefix}faults"] = _faults_text(s[f"{prefix}faults_fused"],
                                                    s[f"{prefix}faults_eager"])
    return table(summaries, SUMMARY_COLUMNS, markdown)


def shape_set_totals(rows):
    """Lines adding up the rows of named shape sets, weighted by their layers: the
    BatchNorm forward+backward time of one training step of the model."""
    groups = {}
    for row in rows:
        if row.get("layers"):
            key = (row["shape_set"], row["dtype"], row["layout"], row["device"])
            groups.setdefault(key, []).append(row)
    lines = []
    for (name, dtype, layout, device), group in groups.items():
        shape_set = SHAPE_SETS[name]
        total_layers = sum(s.relu_layers + s.plain_layers for s in shape_set.layers)
        layers = sum(row["layers"] for row in group)
        fused = sum(row["layers"] * row["fused_ms"] for row in group)
        eager = sum(row["layers"] * row["eager_ms"] for row in group)
        lines.append(
            f"{name} (torchvision {shape_set.model}, batch {shape_set.batch}, {shape_set.size} "
            f"px), {dtype} {layout} {device}: BatchNorm forward+backward of {layers} of its "
            f"{total_layers} layers per step: fused {fused:.1f} ms, eager {eager:.1f} ms "
            f"({eager / fused:.2f}x)")
    return lines
