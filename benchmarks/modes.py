"""Both malloc modes in one benchmark run, each in a fresh process.

mallopt settings are process-wide and cannot be undone reliably, and the page
faults a step pays depend on the allocation history of the whole process. So
`python -m benchmarks` (without --malloc) runs itself twice in subprocesses,
with `--malloc default` (glibc's own settings: what users get) and `--malloc
steady` (tuned, see allocator.py), and merges their rows: the default-malloc
figures are the headline, the tuned ones stand beside them (``tuned_*`` keys).
"""

import json
import os
import subprocess
import sys
import tempfile

MODES = ("default", "steady")
# Options of the parent that a child must not get: the parent writes the outputs.
_OUTPUT_OPTIONS = ("--json", "--markdown", "--plot", "--malloc")
# The columns a tuned row lends the merged row.
TUNED_KEYS = ("fused_ms", "eager_ms", "compile_ms", "speedup_vs_eager", "speedup_vs_compile",
              "spread_vs_eager", "noisy", "busy", "faults_fused", "faults_eager")


def child_argv(argv, mode, json_path):
    """argv without the output options, plus --malloc mode --json json_path."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OUTPUT_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(option + "=" for option in _OUTPUT_OPTIONS)):
            kept.append(arg)
    return [*kept, "--malloc", mode, "--json", json_path]


def run_child(argv, mode):
    """The run (JSON "runs" entry) of `python -m benchmarks ARGV --malloc MODE` in a fresh
    process (its table is not printed; its progress goes to stderr)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{mode}.json")
        print(f"--- malloc mode '{mode}' (a fresh process) ---", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks", *child_argv(argv, mode, path)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)["runs"][mode]


def row_key(row):
    return (row["op"], tuple(row["shape"]), row["dtype"], row["layout"], row["device"])


def merge(headline_rows, tuned_rows):
    """The headline rows, each with the tuned row of the same case as ``tuned_*`` keys."""
    tuned = {row_key(row): row for row in tuned_rows}
    merged = []
    for row in headline_rows:
        other = tuned.get(row_key(row), {})
        merged.append({**row, **{f"tuned_{k}": other[k] for k in TUNED_KEYS if k in other}})
    return merged
