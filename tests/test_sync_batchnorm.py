"""SyncBatchNorm(ReLU) over gloo process groups on CPU, against BatchNorm(ReLU) on the
concatenated batch in one process.

Spawning is slow, so each multi-process run goes through many cases: every rank
trains its share of a global batch for a few steps and saves what it saw
(outputs, gradients, running statistics, collective calls); the test process
replays the global batch through single-process modules and compares.
"""

import copy
import inspect
import os
import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.distributed as dist
from conftest import FUSED_BN, FUSED_BN_RELU, TOLERANCE, TORCH_BN, bn_kind, reference_bn_module
from distributed_harness import COLLECTIVE_TIMEOUT, DistributedRunError, run_distributed
from torch import nn

import fused_bn
from fused_bn.sync_batchnorm import communicated_bytes

# ---- cases ------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A global batch split over the ranks of a group, and the module options."""

    name: str
    splits: tuple  # samples per rank, in group-rank order
    feature_shape: tuple = (3, 5, 4)  # (C, *spatial)
    relu: bool = True
    channels_last: bool = False
    dtype: torch.dtype = torch.float64
    options: dict = field(default_factory=dict)  # SyncBatchNorm constructor options
    steps: int = 3

    def sync_module(self, process_group=None):
        cls = fused_bn.SyncBatchNormReLU if self.relu else fused_bn.SyncBatchNorm
        module = cls(self.feature_shape[0], process_group=process_group, **self.options)
        return _with_test_parameters(module, self).to(self.parameter_dtype)

    def local_module(self, make_module):
        """make_module(kind, channels, **options): a BatchNormXd[+ReLU] module."""
        kind = bn_kind((0, *self.feature_shape))
        module = make_module(kind, self.feature_shape[0], **self.options)
        _with_test_parameters(reference_bn_module(module), self)
        return module.to(self.parameter_dtype)

    @property
    def parameter_dtype(self):
        """float32 parameters and statistics for half/bfloat16 input (mixed precision)."""
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    def global_batch(self, step):
        """(input, grad_output) of the whole group at a training step; step == steps is
        the eval batch."""
        g = torch.Generator().manual_seed(1000 * step + len(self.name))
        shape = (sum(self.splits), *self.feature_shape)
        channel_shape = (1, -1) + (1,) * (len(shape) - 2)
        # Per-channel offsets well away from zero exercise the merge's cancellation.
        scale = torch.rand(self.feature_shape[0], generator=g, dtype=torch.float64) + 0.5
        offset = 4 * torch.randn(self.feature_shape[0], generator=g, dtype=torch.float64)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale.view(channel_shape)
        x = x + offset.view(channel_shape)
        grad_output = torch.randn(shape, generator=g, dtype=torch.float64)
        return self._layout(x.to(self.dtype)), self._layout(grad_output.to(self.dtype))

    def rank_slice(self, group_rank):
        start = sum(self.splits[:group_rank])
        return slice(start, start + self.splits[group_rank])

    def _layout(self, t):
        if not self.channels_last:
            return t
        return t.contiguous(memory_format=_channels_last_format(t))


def _channels_last_format(t):
    return torch.channels_last if t.dim() == 4 else torch.channels_last_3d


def fused_module(relu):
    family = FUSED_BN_RELU if relu else FUSED_BN
    return lambda kind, channels, **options: family[kind](channels, **options)


def torch_module(relu):
    def make(kind, channels, **options):
        bn = TORCH_BN[kind](channels, **options)
        return nn.Sequential(bn, nn.ReLU()) if relu else bn

    return make


def _with_test_parameters(module, case):
    g = torch.Generator().manual_seed(7)
    channels = case.feature_shape[0]
    with torch.no_grad():
        if module.weight is not None:
            # Some negative scales, so that ReLU masks differ per channel.
            module.weight.copy_(torch.randn(channels, generator=g) * 0.8 + 0.4)
        if module.bias is not None:
            module.bias.copy_(torch.randn(channels, generator=g) * 0.3)
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(channels, generator=g) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return module


# ---- what a rank does -------------------------------------------------------------


class CollectiveCounter:
    """Counts calls of torch.distributed's collectives, by name, and the bytes of
    the buffer each writes (its first argument), while active."""

    NAMES = (
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_single",
        "all_reduce",
        "broadcast",
        "reduce_scatter_tensor",
        "all_to_all_single",
    )

    def __init__(self):
        self.calls = {}
        self.bytes = {}
        self._originals = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original
            setattr(dist, name, self._counting(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _counting(self, name, original):
        def counted(output, *args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                size = output.numel() * output.element_size()
                self.bytes[name] = self.bytes.get(name, 0) + size
            return original(output, *args, **kwargs)

        return counted


def train_rank(case, group_rank, process_group):
    """Trains case.sync_module on this rank's share for case.steps steps, then runs
    one eval step; returns everything the test compares."""
    module = case.sync_module(process_group)
    record = {
        "outputs": [],
        "grad_inputs": [],
        "grad_weights": [],
        "grad_biases": [],
        "layout_kept": [],
    }
    rows = case.rank_slice(group_rank)
    with CollectiveCounter() as train_calls:
        for step in range(case.steps):
            x, grad_output = case.global_batch(step)
            x = x[rows].detach().requires_grad_()
            output = module(x)
            output.backward(grad_output[rows])
            record["outputs"].append(output.detach())
            record["grad_inputs"].append(x.grad)
            record["layout_kept"].append(
                output.is_contiguous(memory_format=_channels_last_format(x))
                and x.grad.is_contiguous(memory_format=_channels_last_format(x))
                if case.channels_last
                else output.is_contiguous()
            )
            _pop_parameter_grads(module, record)
    module.eval()
    with CollectiveCounter() as eval_calls:
        record["eval_output"] = module(case.global_batch(case.steps)[0][rows])
    record.update(
        train_calls=train_calls.calls,
        train_bytes=train_calls.bytes,
        eval_calls=eval_calls.calls,
        running_mean=module.running_mean,
        running_var=module.running_var,
        num_batches_tracked=module.num_batches_tracked,
    )
    return record


def run_jobs(rank, world_size, jobs):
    """`jobs`: a list of rounds; each round lists (group ranks or None for the whole
    world, case) pairs covering every rank. Every rank creates every group of a
    round (torch.distributed requires it), then runs the case of its own group."""
    results = {}
    for round_ in jobs:
        groups = [dist.new_group(ranks) if ranks is not None else None for ranks, _ in round_]
        for (ranks, case), group in zip(round_, groups):
            members = ranks if ranks is not None else list(range(world_size))
            if rank in members:
                results[case.name] = train_rank(case, members.index(rank), group)
    return results


# ---- what the test process checks -----------------------------------------------


def reference_run(case, make_module):
    """The same steps through a single-process module on the concatenated batch."""
    module = case.local_module(make_module)
    bn = reference_bn_module(module)
    record = {"outputs": [], "grad_inputs": [], "grad_weights": [], "grad_biases": []}
    for step in range(case.steps):
        x, grad_output = case.global_batch(step)
        x = x.detach().requires_grad_()
        output = module(x)
        output.backward(grad_output)
        record["outputs"].append(output.detach())
        record["grad_inputs"].append(x.grad)
        _pop_parameter_grads(bn, record)
    module.eval()
    # Per rank: without running statistics, eval normalizes each rank's batch on its own.
    x = case.global_batch(case.steps)[0]
    record["eval_outputs"] = [module(x[case.rank_slice(r)]) for r in range(len(case.splits))]
    record["bn"] = bn
    return record


def _pop_parameter_grads(module, record):
    for param, key in ((module.weight, "grad_weights"), (module.bias, "grad_biases")):
        if param is not None:
            record[key].append(param.grad.clone())
            param.grad = None


def check_case(case, rank_records):
    """rank_records: the records of the group's ranks, in group-rank order."""
    tolerance = TOLERANCE[case.dtype]
    # Two all-gathers per forward (the header, the statistics), one all_reduce per
    # backward, of the documented sizes.
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    gathered, reduced = communicated_bytes(case.feature_shape[0], len(case.splits), case.dtype)
    sync_calls = {gather: 2 * case.steps, "all_reduce": case.steps}
    sync_bytes = {gather: case.steps * gathered, "all_reduce": case.steps * reduced}
    for make_module in (fused_module(case.relu), torch_module(case.relu)):
        ref = reference_run(case, make_module)
        for group_rank, record in enumerate(rank_records):
            rows = case.rank_slice(group_rank)
            for step in range(case.steps):
                torch.testing.assert_close(
                    record["outputs"][step], ref["outputs"][step][rows], **tolerance
                )
                torch.testing.assert_close(
                    record["grad_inputs"][step], ref["grad_inputs"][step][rows], **tolerance
                )
            torch.testing.assert_close(
                record["eval_output"], ref["eval_outputs"][group_rank], **tolerance
            )
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(record[key], getattr(ref["bn"], key), **tolerance)
            assert all(record["layout_kept"]), "output/grad_input lost the input's layout"
            assert record["eval_calls"] == {}, "eval must not communicate"
            synchronized = len(case.splits) > 1
            assert record["train_calls"] == (sync_calls if synchronized else {})
            assert record["train_bytes"] == (sync_bytes if synchronized else {})
        # Parameter gradients are per rank (DDP sums them): their sum is the global one.
        for key in ("grad_weights", "grad_biases"):
            assert len(ref[key]) == len(rank_records[0][key])
            for step, expected in enumerate(ref[key]):
                total = sum(record[key][step] for record in rank_records)
                torch.testing.assert_close(total, expected, **tolerance)


# ---- multi-process tests --------------------------------------------------------------

TWO_RANK_CASES = [
    Case("even_relu_2d", splits=(4, 4)),
    Case(
        "uneven_channels_last_cumulative",
        splits=(5, 2),
        channels_last=True,
        options=dict(momentum=None),
    ),
    Case("empty_rank_identity_nc", splits=(0, 6), feature_shape=(4,), relu=False),
    Case(
        "relu_3d_channels_last_float32",
        splits=(3, 5),
        feature_shape=(4, 3, 2, 2),
        channels_last=True,
        dtype=torch.float32,
    ),
    Case(
        "no_affine_no_running_stats",
        splits=(2, 3),
        feature_shape=(3, 6),
        relu=False,
        options=dict(affine=False, track_running_stats=False),
    ),
    Case("no_bias_relu", splits=(6, 1), feature_shape=(2, 7), options=dict(bias=False)),
    Case(
        "bfloat16_channels_last",
        splits=(2, 4),
        feature_shape=(3, 4, 4),
        channels_last=True,
        dtype=torch.bfloat16,
    ),
]

THREE_RANK_CASES = [
    Case("three_ranks_empty_middle", splits=(3, 0, 4), channels_last=True),
    Case(
        "three_ranks_identity",
        splits=(2, 3, 1),
        feature_shape=(5, 3),
        relu=False,
        options=dict(momentum=0.3, eps=1e-3),
    ),
]
SUBGROUP_PAIR = Case("subgroup_of_two", splits=(2, 5))
SUBGROUP_SINGLE = Case("subgroup_of_one", splits=(6,), feature_shape=(3, 4))


def single_value_per_channel(rank, world_size):
    """Ranks holding 1 and 0 samples of (N, C) input: one value per channel overall."""
    module = fused_bn.SyncBatchNorm(3).double()
    before = copy.deepcopy(module.state_dict())
    x = torch.randn(1 if rank == 0 else 0, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as error:
        module(x)
    return dict(message=str(error.value), before=before, after=module.state_dict())


def double_backward_error(rank, world_size):
    """The message of differentiating a synchronized step's input gradient again."""
    module = fused_bn.SyncBatchNormReLU(3).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    # A loss whose gradient depends on the output, so that grad_x depends on x twice.
    (grad_x,) = torch.autograd.grad(module(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError) as error:
        grad_x.pow(2).sum().backward()
    return str(error.value)


def transform_errors(rank, world_size):
    """A synchronized step under forward-mode AD and under torch.func.grad: the
    messages, and whether the state stayed as it was."""
    module = fused_bn.SyncBatchNormReLU(3).double()
    before = copy.deepcopy(module.state_dict())
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    messages = []
    with pytest.raises(RuntimeError) as error, forward_ad.dual_level():
        module(forward_ad.make_dual(x, torch.ones_like(x)))
    messages.append(str(error.value))
    with pytest.raises(RuntimeError) as error:
        torch.func.grad(lambda t: module(t).sum())(x)
    messages.append(str(error.value))
    unchanged = all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    return dict(messages=messages, unchanged=unchanged)


def two_rank_scenario(rank, world_size):
    results = run_jobs(rank, world_size, [[(None, case)] for case in TWO_RANK_CASES])
    results["single_value"] = single_value_per_channel(rank, world_size)
    results["double_backward"] = double_backward_error(rank, world_size)
    results["transforms"] = transform_errors(rank, world_size)
    return results


def three_rank_scenario(rank, world_size):
    rounds = [[(None, case)] for case in THREE_RANK_CASES]
    rounds.append([([0, 1], SUBGROUP_PAIR), ([2], SUBGROUP_SINGLE)])
    return run_jobs(rank, world_size, rounds)


def test_two_ranks(tmp_path):
    results = run_distributed(tmp_path, 2, two_rank_scenario)
    for case in TWO_RANK_CASES:
        check_case(case, [r[case.name] for r in results])
    for r in results:
        single = r["single_value"]
        for key, value in single["before"].items():
            torch.testing.assert_close(single["after"][key], value, rtol=0, atol=0)
        # Second derivatives of the synchronized op are not implemented.
        assert "once_differentiable" in r["double_backward"]
        # Nor are forward-mode AD and torch.func: raised before the step runs.
        for message in r["transforms"]["messages"]:
            assert "SyncBatchNormReLU: a synchronized training step supports neither" in message
        assert r["transforms"]["unchanged"]


def test_three_ranks_and_subgroups(tmp_path):
    results = run_distributed(tmp_path, 3, three_rank_scenario)
    for case in THREE_RANK_CASES:
        check_case(case, [r[case.name] for r in results])
    check_case(SUBGROUP_PAIR, [results[0][SUBGROUP_PAIR.name], results[1][SUBGROUP_PAIR.name]])
    check_case(SUBGROUP_SINGLE, [results[2][SUBGROUP_SINGLE.name]])


def dies_on_rank_1(rank, world_size):
    if rank == 1:
        os._exit(3)
    dist.all_reduce(torch.zeros(1))  # would wait for rank 1 until the gloo timeout


def test_harness_fails_fast_when_a_worker_dies(tmp_path):
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match="rank 1: exit code 3"):
        run_distributed(tmp_path, 2, dies_on_rank_1)
    assert time.monotonic() - start < COLLECTIVE_TIMEOUT.total_seconds()


# ---- single-process tests ---------------------------------------------------------------


@pytest.mark.parametrize("cls", [fused_bn.SyncBatchNorm, fused_bn.SyncBatchNormReLU])
def test_constructor_signature_and_state_dict_are_torchs(cls):
    def parameters(init):  # names, kinds and defaults; annotations aside
        return [(p.name, p.kind, p.default) for p in inspect.signature(init).parameters.values()]

    assert parameters(cls.__init__) == parameters(nn.SyncBatchNorm.__init__)
    torch.manual_seed(0)
    reference = nn.SyncBatchNorm(4, momentum=0.2, bias=False)
    reference.running_mean.uniform_()
    module = cls(4, momentum=0.2, bias=False)
    module.load_state_dict(reference.state_dict())
    assert list(module.state_dict()) == list(reference.state_dict())
    assert module.process_group is None and module.momentum == 0.2 and module.bias is None


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((6, 3), "contiguous"),
        ((4, 3, 5), "contiguous"),
        ((4, 3, 5, 2), "channels_last"),
        ((2, 3, 2, 3, 2), "channels_last"),
    ],
)
@pytest.mark.parametrize("relu", [False, True])
def test_without_process_group_runs_the_local_op(shape, layout, relu):
    """No initialized process group: exactly fused_bn's single-process module."""
    assert not dist.is_initialized()
    case = Case(
        "local",
        splits=(shape[0],),
        feature_shape=shape[1:],
        relu=relu,
        channels_last=layout == "channels_last",
    )
    local = case.local_module(fused_module(relu))
    sync = case.sync_module()
    x, grad_output = case.global_batch(0)
    for module in (local, sync):
        inp = x.detach().requires_grad_()
        module.output = module(inp)
        module.output.backward(grad_output)
        module.grad_input = inp.grad
    for key in ("output", "grad_input"):
        torch.testing.assert_close(getattr(sync, key), getattr(local, key), rtol=0, atol=0)
    torch.testing.assert_close(sync.state_dict(), local.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(sync.weight.grad, local.weight.grad, rtol=0, atol=0)
    assert sync.output.stride() == local.output.stride()


def test_bad_input_raises_torchs_errors_and_changes_nothing():
    module = fused_bn.SyncBatchNormReLU(3)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        module(torch.randn(3))
    with pytest.raises(
        ValueError, match="SyncBatchNorm number of input channels should be non-zero"
    ):
        module(torch.randn(4, 0, 2))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(torch.randn(1, 3))
    torch.testing.assert_close(module.state_dict(), before, rtol=0, atol=0)


def test_convert_sync_batchnorm_carries_parameters_buffers_and_mode():
    frozen = fused_bn.BatchNormReLU2d(4)
    frozen.weight.requires_grad_(False)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        frozen,
        nn.Sequential(
            fused_bn.BatchNorm2d(4, bias=False).eval(),
            nn.SyncBatchNorm(4, affine=False, track_running_stats=False),
        ),
        fused_bn.BatchNormReLU2d(4, momentum=None, eps=1e-3),
    ).double()
    for m in model.modules():
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(5)
    original = copy.deepcopy(model)
    conv = model[0]
    sources = [model[1], model[3], model[4][0], model[4][1], model[5]]
    group = object()  # any process group handle; only stored
    converted = fused_bn.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    targets = [converted[1], converted[3], converted[4][0], converted[4][1], converted[5]]
    expected_types = [
        fused_bn.SyncBatchNorm,
        fused_bn.SyncBatchNormReLU,
        fused_bn.SyncBatchNorm,
        fused_bn.SyncBatchNorm,
        fused_bn.SyncBatchNormReLU,
    ]
    for source, target, expected_type in zip(sources, targets, expected_types):
        assert type(target) is expected_type
        assert target.process_group is group and target.training == source.training
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(target, name) == getattr(source, name)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(target, name) is getattr(source, name)  # the same tensors
    assert not converted[3].weight.requires_grad and converted[3].bias.requires_grad
    assert converted[0] is conv
    # Without a process group the converted model computes what the original did.
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), **TOLERANCE[torch.float64])
    torch.testing.assert_close(
        converted.state_dict(), original.state_dict(), **TOLERANCE[torch.float64]
    )
    # A BatchNorm layer itself is replaced, as torch's helper does.
    single = fused_bn.SyncBatchNormReLU.convert_sync_batchnorm(nn.BatchNorm1d(2))
    assert type(single) is fused_bn.SyncBatchNorm
