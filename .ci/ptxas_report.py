"""Summarizes `ptxas -v` output of a build log for fused_bn's kernels and fails
on register spills.

    python .ci/ptxas_report.py build-cuda/build.log

Prints, per kernel family and architecture, the most registers any
instantiation uses, and exits with 1 if any fused_bn kernel spills (spill
stores or loads > 0) or if the log holds no fused_bn kernel at all.
"""

import re
import subprocess
import sys
from collections import defaultdict

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines() if out.returncode == 0 else []
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def parse(lines):
    """(mangled name, arch) -> {'registers', 'stack', 'spill_stores', 'spill_loads'}."""
    kernels, current = {}, None
    for line in lines:
        if m := ENTRY.search(line):
            current = (m.group(1), m.group(2))
            kernels[current] = {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
        elif current and (m := SPILLS.search(line)):
            stack, stores, loads = map(int, m.groups())
            kernels[current].update(stack=stack, spill_stores=stores, spill_loads=loads)
        elif current and (m := REGISTERS.search(line)):
            kernels[current]["registers"] = int(m.group(1))
    return kernels


def family(demangled):
    """`fused_bn::cuda::planar_partials_kernel<...>(...)` -> `planar_partials_kernel`."""
    name = demangled.split("(")[0].split("<")[0]
    return name.rsplit("::", 1)[-1]


def main(path):
    with open(path, errors="replace") as f:
        kernels = parse(f)
    names = demangle(sorted({name for name, _ in kernels}))
    ours = {key: v for key, v in kernels.items() if "fused_bn::" in names[key[0]].split("(")[0]}
    if not ours:
        print(f"ptxas_report: no fused_bn kernel in {path} (was -Xptxas -v passed?)")
        return 1
    summary = defaultdict(lambda: {"count": 0, "registers": 0, "stack": 0, "spills": 0})
    spilling = []
    for (name, arch), v in ours.items():
        s = summary[(family(names[name]), arch)]
        s["count"] += 1
        s["registers"] = max(s["registers"], v["registers"])
        s["stack"] = max(s["stack"], v["stack"])
        s["spills"] = max(s["spills"], v["spill_stores"] + v["spill_loads"])
        if v["spill_stores"] or v["spill_loads"]:
            spilling.append(f"{arch} {names[name]}: {v['spill_stores']} B stored, "
                            f"{v['spill_loads']} B loaded")
    print(f"{'kernel':34} {'arch':7} {'variants':>8} {'max regs':>8} "
          f"{'max stack':>9} {'spill B':>7}")
    for (fam, arch), s in sorted(summary.items()):
        print(f"{fam:34} {arch:7} {s['count']:8} {s['registers']:8} {s['stack']:9} {s['spills']:7}")
    if spilling:
        print("ptxas_report: register spills in fused_bn kernels:\n  " + "\n  ".join(spilling))
        return 1
    print(f"ptxas_report: {len(ours)} fused_bn kernel builds, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
