"""Helpers of the hardening tests: run a call through PyTorch and through fused_bn and
compare what happened (values, NaN/Inf positions, exceptions, state left behind), and run
code that may crash the interpreter in another process, so that a crash fails a test
instead of killing pytest."""

import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass

import torch
from torch import nn

import fused_bn

# ---- outcomes ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a call did: its value, or the exception it raised."""

    value: object = None
    error: BaseException = None

    @property
    def raised(self):
        return self.error is not None

    def describe(self):
        if self.raised:
            return f"raised {type(self.error).__name__}: {self.error}"
        return f"returned {self.value!r:.200}"


def outcome(fn, *args, **kwargs):
    try:
        return Outcome(value=fn(*args, **kwargs))
    except Exception as error:  # noqa: BLE001 - every exception is an outcome to compare
        return Outcome(error=error)


# (PyTorch's, fused_bn's) operator, which some messages name: see assert_same_error.
BATCH_NORM_OPERATOR = ("native_batch_norm", "fused_bn::batch_norm_act")


def torch_fails_on_zero_channels(expected, input):
    """Whether `expected` is PyTorch's failure on an empty batch with zero-element
    parameters (zero channels): its empty-batch path indexes weight[0] and raises an
    internal IndexError. fused_bn does better there and returns the empty output (see
    test_hardening_regressions.test_zero_channels_give_an_empty_output)."""
    return (
        expected.raised
        and isinstance(expected.error, IndexError)
        and str(expected.error).startswith("select(): index 0 out of range for tensor of size [0]")
        and input.dim() >= 2
        and input.numel() == 0
    )


def assert_empty_output_where_torch_fails_on_zero_channels(expected, actual, input):
    """Where PyTorch fails on zero channels, fused_bn returns an empty output of the
    input's shape; returns whether that was the case."""
    if not torch_fails_on_zero_channels(expected, input):
        return False
    assert not actual.raised, f"zero channels: fused_bn {actual.describe()}"
    assert actual.value.shape == input.shape
    return True


def assert_same_error(expected, actual, contains=False, operator=None):
    """`actual` (fused_bn's outcome) raised what `expected` (PyTorch's) raised: the same
    exception type and message (or, with contains, a message containing PyTorch's).
    `operator`: (PyTorch's, fused_bn's) name of the operator a message names, where the
    message is PyTorch's about the operator that ran."""
    assert expected.raised, f"test bug: PyTorch did not raise, it {expected.describe()}"
    assert actual.raised, (
        f"PyTorch {expected.describe()}, but fused_bn {actual.describe()}"
    )
    assert type(actual.error) is type(expected.error), (
        f"PyTorch {expected.describe()}, fused_bn {actual.describe()}"
    )
    expected_message = str(expected.error)
    if operator is not None:
        expected_message = expected_message.replace(f"'{operator[0]}'", f"'{operator[1]}'")
    if contains:
        assert expected_message in str(actual.error), (
            f"PyTorch {expected.describe()}, fused_bn {actual.describe()}"
        )
    else:
        assert str(actual.error) == expected_message, (
            f"PyTorch {expected.describe()}, fused_bn {actual.describe()}"
        )


def assert_both_raise_or_neither(expected, actual):
    """When PyTorch raises, fused_bn raises the same; when PyTorch returns, so does fused_bn."""
    if expected.raised:
        assert_same_error(expected, actual)
    else:
        assert not actual.raised, f"PyTorch {expected.describe()}, fused_bn {actual.describe()}"


# ---- values ---------------------------------------------------------------------------------


def assert_nonfinite_match(actual, expected, what):
    """NaN exactly where PyTorch has NaN, and the same infinities."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double()
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: NaN positions differ from PyTorch's ({int(nan_a.sum())} NaN vs "
            f"{int(nan_e.sum())}); e.g. at {idx}: fused_bn "
            f"{[a[tuple(i)].item() for i in idx]}, PyTorch {[e[tuple(i)].item() for i in idx]}"
        )
    inf_a, inf_e = a.isinf(), e.isinf()
    if not (torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e])):
        idx = ((inf_a != inf_e) | (inf_e & (a != e))).nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: infinities differ from PyTorch's; e.g. at {idx}: fused_bn "
            f"{[a[tuple(i)].item() for i in idx]}, PyTorch {[e[tuple(i)].item() for i in idx]}"
        )


def assert_close_to_torch(actual, expected, atol, rtol, what):
    """Finite values within atol + rtol * |expected|; NaN and Inf exactly where PyTorch's are."""
    assert_nonfinite_match(actual, expected, what)
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), atol=atol, rtol=rtol,
        equal_nan=True, msg=lambda m: f"{what}: {m}",
    )


# ---- state ----------------------------------------------------------------------------------


def snapshot(**things):
    """Copies of every parameter (value, requires_grad, grad), buffer and tensor given, by name:
    modules are expanded into their parameters and buffers."""
    state = {}
    for name, thing in things.items():
        if isinstance(thing, nn.Module):
            for key, tensor in thing.named_parameters():
                state[f"{name}.{key}"] = _copy(tensor)
            for key, tensor in thing.named_buffers():
                state[f"{name}.{key}"] = _copy(tensor)
        elif isinstance(thing, torch.Tensor):
            state[name] = _copy(thing)
    return state


def _copy(tensor):
    grad = tensor.grad if tensor.is_leaf else None
    grad = grad.detach().clone() if grad is not None else None
    return (tensor.detach().clone(), tensor.requires_grad, grad)


def assert_unchanged(before, **things):
    """Every parameter, buffer and tensor is as `snapshot` saw it: values (NaN where NaN
    was), dtype, shape, requires_grad and grad."""
    after = snapshot(**things)
    assert after.keys() == before.keys(), f"state keys changed: {before.keys()} -> {after.keys()}"
    for key, (value, requires_grad, grad) in before.items():
        new_value, new_requires_grad, new_grad = after[key]
        assert new_value.dtype == value.dtype and new_value.shape == value.shape, key
        assert same_values(new_value, value), (
            f"{key} changed by a call that raised: {value} -> {new_value}"
        )
        assert new_requires_grad == requires_grad, f"{key}.requires_grad changed"
        assert (grad is None) == (new_grad is None), f"{key}.grad changed"
        if grad is not None:
            assert same_values(new_grad, grad), f"{key}.grad changed"


def same_values(a, b):
    """Equal values, NaN equal to NaN (meta tensors have none to compare)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return a.device == b.device
    if a.is_floating_point() or a.is_complex():
        nan_a, nan_b = a.isnan(), b.isnan()
        return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
    return torch.equal(a, b)


# ---- crashes ------------------------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fused_bn.__file__)))
SNIPPET_TIMEOUT_S = 120


def signal_name(returncode):
    if returncode is not None and returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return None


def run_snippet(code, timeout=SNIPPET_TIMEOUT_S):
    """Runs `code` with `python -c` in a fresh interpreter that imports the fused_bn under
    test; fails the calling test if it crashes (SIGFPE, SIGSEGV, abort), exits with an
    error or hangs. Returns its stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(f"the snippet did not finish in {timeout} s:\n{code}") from expired
    crashed = signal_name(done.returncode)
    stderr = _without_noise(done.stderr)
    if crashed:
        raise AssertionError(f"the process was killed by {crashed}:\n{code}\nstderr:\n{stderr}")
    if done.returncode != 0:
        raise AssertionError(f"the snippet failed (exit {done.returncode}):\n{stderr}")
    return done.stdout


def _without_noise(stderr):
    return "\n".join(line for line in stderr.splitlines() if "NumPy" not in line)


class _ChildFailure(Exception):
    pass


_warmed_up = []


def _warm_up():
    """Runs, once in this process, what the children run, so that modules torch imports
    lazily (sympy with autograd's backward, ...) are imported once here rather than in
    every child."""
    if _warmed_up:
        return
    _warmed_up.append(True)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    for module in (fused_bn.BatchNormReLU1d(3).double(), nn.BatchNorm1d(3).double()):
        module(x).sum().backward()
        module.eval()(x).sum().backward()
    fused_bn.functional.dropout(x, 0.5).sum().backward()
    nn.functional.dropout(x, 0.5).sum().backward()
    torch.testing.assert_close(x, x)


def run_forked(fn, *args, timeout=SNIPPET_TIMEOUT_S):
    """fn(*args) in a forked child (one intra-op thread: OpenMP does not survive a fork
    otherwise): its exception is re-raised here as an AssertionError carrying the child's
    traceback; a crash or a hang becomes an AssertionError too. Cheap (milliseconds), so
    property-based tests run every example this way."""
    _warm_up()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            torch.set_num_threads(1)
            try:
                fn(*args)
                message = None
            except BaseException:  # noqa: BLE001 - reported to the parent
                message = traceback.format_exc()
                status = 1
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(message, pipe)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"{fn.__name__}{args!r:.300} did not finish in {timeout} s")
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise AssertionError(
            f"{fn.__name__}{args!r:.300} killed the process with "
            f"{signal.Signals(os.WTERMSIG(status)).name}"
        )
    message = pickle.loads(data) if data else "the child exited without a report"
    if message is not None:
        raise AssertionError(f"in a forked child:\n{message}")
