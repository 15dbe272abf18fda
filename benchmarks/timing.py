"""Interleaved timing and the benchmark's own noise measurement.

Every benchmark here compares implementations by ratios of their times on the
same machine in the same minute. A shared machine's load changes over seconds,
so the implementations take turns (rounds ABC ABC ...) and each round yields
one time per implementation: a ratio per round. How much those per-round
ratios spread says how far the reported ratio can be trusted, and the load
average before and after a run says whether other processes wanted the CPUs
the benchmark's threads needed.
"""

import dataclasses
import gc
import math
import os
import statistics
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch

# A row whose per-round ratios spread more than this (see ratio_spread) is flagged.
NOISE_THRESHOLD = 0.2


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_block(fn, calls, device):
    """Seconds per call of `calls` back-to-back calls (garbage collector paused)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        return (time.perf_counter() - start) / calls
    finally:
        if gc_was_enabled:
            gc.enable()


def interleaved_times(fns, device, min_run_time, rounds, warm_up=True):
    """{name: [seconds per call in each round]} of the callables in `fns`.

    After one warm-up call each (unless the caller made it), every callable
    gets a block of calls lasting about min_run_time / rounds in each round
    (sized by one more call); the order within a round rotates so that no
    implementation always follows the same one.
    """
    names = list(fns)
    for fn in fns.values() if warm_up else ():
        fn()  # allocations, first-call dispatch, compilation
    per_round = min_run_time / rounds
    calls = {name: max(1, round(per_round / _time_block(fns[name], 1, device))) for name in names}
    times = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_time_block(fns[name], calls[name], device))
    return times


def median(values):
    return statistics.median(values)


def ratio(times, numerator, denominator):
    """numerator's median time over denominator's (a speedup of `denominator`)."""
    return median(times[numerator]) / median(times[denominator])


def ratio_spread(times, numerator, denominator):
    """How much the per-round ratios numerator / denominator disagree: the range of
    their middle half (a quarter of the rounds dropped at each end, so that a
    single odd round of five does not count) over their median; 0 for one round."""
    ratios = sorted(n / d for n, d in zip(times[numerator], times[denominator]))
    cut = len(ratios) // 4
    middle = ratios[cut:len(ratios) - cut]
    return (middle[-1] - middle[0]) / median(ratios)


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def minor_faults():
    """This process's minor page faults so far (0 where getrusage is unavailable)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def faults_per_call(fn, device, calls=5):
    """Minor page faults per call of fn, in steady state (after timing)."""
    start = minor_faults()
    for _ in range(calls):
        fn()
    sync(device)
    return (minor_faults() - start) / calls


def cpu_count():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average():
    """The one-minute load average, None where the OS does not report it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_cpu_seconds():
    """CPU seconds all processes (and the hypervisor, as steal time) have used since boot;
    None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    """CPU seconds of this process and its finished child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclasses.dataclass
class Load:
    """How busy the machine was around a run, against the threads the run used.

    ``others``: the CPUs that other processes (and steal time) kept busy on
    average during the run, from /proc/stat less the run's own CPU time. Where
    that is not available the one-minute load average before the run stands in
    (the average after it includes the run itself, and in a run started right
    after another one, "before" includes that one too).
    """

    cpus: int
    threads: int
    before: float = None  # load averages
    after: float = None
    others: float = None

    @classmethod
    def start(cls, threads):
        load = cls(cpu_count(), threads, before=load_average())
        load._start = (time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds())
        return load

    def stop(self):
        self.after = load_average()
        wall, busy, own = self._start
        busy_now = busy_cpu_seconds()
        if busy is not None and busy_now is not None:
            others = (busy_now - busy) - (own_cpu_seconds() - own)
            self.others = max(0.0, others / (time.perf_counter() - wall))
        return self

    def contended(self):
        """Whether other processes wanted more CPUs than the run left free, by half a CPU."""
        others = self.others if self.others is not None else self.before
        return others is not None and others > self.cpus - self.threads + 0.5

    def describe(self):
        text = f"{self.threads} thread{'s' * (self.threads != 1)} on {self.cpus} CPUs"
        if self.others is not None:
            text += f", other processes used {self.others:.2f} CPUs meanwhile"
        if self.before is not None:
            text += f" (load average {self.before:.2f} before"
            text += f", {self.after:.2f} after)" if self.after is not None else ")"
        return text


def mark_busy(row, load):
    """Records in `row` the CPUs other processes used while it was timed, and whether
    they competed with its threads: a row can have consistent rounds and wrong ratios
    when every round waited for a descheduled thread."""
    if load.others is not None:
        row["others_cpus"] = load.others
        row["busy"] = load.contended()


def noise_verdict(load, rows, threshold=NOISE_THRESHOLD):
    """Lines saying plainly why the ratios of `rows` may not be trustworthy; [] if none."""
    lines = []
    if load.contended():
        lines.append(
            f"the machine was busy ({load.describe()}): other processes competed for the "
            "CPUs the benchmark's threads ran on")
    noisy = [row for row in rows if row.get("noisy")]
    if noisy:
        lines.append(
            f"{len(noisy)} of {len(rows)} rows are noisy: their per-round ratios spread more "
            f"than {threshold:.0%} (marked 'noisy')")
    busy = [row for row in rows if row.get("busy")]
    if busy:
        lines.append(
            f"{len(busy)} of {len(rows)} rows were timed while other processes used CPUs "
            "their threads needed (marked 'busy')")
    return lines
