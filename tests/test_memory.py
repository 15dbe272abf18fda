"""fused_bn.memory: fused outputs recomputed in backward instead of kept.

Every result is compared bit for bit with the same model run without it; the
saved bytes are accounted exactly on hand-built models.
"""

import contextlib
import copy
import gc
import weakref

import pytest
import torch
import torch.utils.checkpoint
from distributed_harness import run_distributed
from torch import nn

import fused_bn
from fused_bn import memory


class Net(nn.Module):
    """Fused outputs saved by a convolution, by two consumers at once, by another
    fused BatchNorm, by pooling, and as a view (flatten, then linear)."""

    def __init__(self, activation="silu"):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_relu = fused_bn.BatchNormReLU2d(8)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_chained = fused_bn.BatchNormAct2d(8, activation="hardswish")
        self.bn_act = fused_bn.BatchNormAct2d(8, activation=activation)
        self.pool = nn.MaxPool2d(2)
        self.bn_head = fused_bn.BatchNorm2d(8, affine=False)
        self.linear = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        h = self.bn_relu(self.stem(x))
        y = self.bn_act(self.conv_a(h) + self.conv_b(h) + self.bn_chained(h))
        return self.linear(self.bn_head(self.pool(y)).flatten(1))


def fused_modules(model):
    return [m for m in model.modules() if isinstance(m, fused_bn.BatchNormAct2d)]


def make_pair(dtype=torch.float32, memory_format=torch.contiguous_format, activation="silu"):
    torch.manual_seed(0)
    model = Net(activation).to(dtype=dtype, memory_format=memory_format)
    x = torch.randn(4, 3, 8, 8, dtype=dtype).to(memory_format=memory_format).requires_grad_()
    return model, copy.deepcopy(model), x


def run(model, x, recompute, steps=1, backward=lambda loss: loss.backward()):
    x = x.detach().clone().requires_grad_()
    for _ in range(steps):
        with memory.recompute() if recompute else contextlib.nullcontext():
            output = model(x)
        backward((output.float() ** 2).sum())
    return output, x


def assert_same_results(plain, recomputed, x_plain, x_recomputed, out_plain, out_recomputed):
    assert torch.equal(out_plain, out_recomputed)
    assert torch.equal(x_plain.grad, x_recomputed.grad)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), recomputed.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("training", [True, False])
def test_bit_identical(dtype, memory_format, training):
    plain, recomputed, x = make_pair(dtype, memory_format)
    plain.train(training)
    recomputed.train(training)
    out_plain, x_plain = run(plain, x, False, steps=2)
    out_recomputed, x_recomputed = run(recomputed, x, True, steps=2)
    assert_same_results(plain, recomputed, x_plain, x_recomputed, out_plain, out_recomputed)


@pytest.mark.parametrize("activation", ["relu", "relu6", "leaky_relu", "elu", "identity"])
def test_bit_identical_activations(activation):
    plain, recomputed, x = make_pair(activation=activation)
    out_plain, x_plain = run(plain, x, False)
    out_recomputed, x_recomputed = run(recomputed, x, True)
    assert_same_results(plain, recomputed, x_plain, x_recomputed, out_plain, out_recomputed)


def saved_storages(model, x, recompute):
    """{storage address: bytes} of what one forward keeps for backward (parameters
    excluded), seen by hooks that enclose the recompute block, and the addresses of
    the fused modules' outputs."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, fused_outputs = {}, set()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def note_output(module, args, output):
        fused_outputs.add(output.untyped_storage().data_ptr())

    hooks = [m.register_forward_hook(note_output) for m in fused_modules(model)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(model, x, recompute)
    for hook in hooks:
        hook.remove()
    return storages, fused_outputs


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_saved_bytes_of_fused_outputs_are_gone_exactly(memory_format):
    plain, recomputed, x = make_pair(memory_format=memory_format)
    before, fused_outputs = saved_storages(plain, x, recompute=False)
    after, _ = saved_storages(recomputed, x, recompute=True)
    fused_saved = {p: n for p, n in before.items() if p in fused_outputs}
    # bn_relu (3 consumers), bn_act (pooling), bn_head (as a view; channels_last
    # flattens into a copy); bn_chained's output is only added, which keeps nothing.
    as_view = memory_format == torch.contiguous_format
    assert len(fused_saved) == 2 + as_view
    assert sum(fused_saved.values()) == 4 * 8 * 8 * 8 * 4 * 2 + as_view * 4 * 8 * 4 * 4 * 4
    assert sum(after.values()) == sum(before.values()) - sum(fused_saved.values())


def test_recomputed_outputs_are_freed_after_forward():
    plain, recomputed, x = make_pair()
    for model, recompute, alive in ((plain, False, 3), (recomputed, True, 0)):
        outputs = []

        def note_output(module, args, output, outputs=outputs):
            outputs.append(weakref.ref(output))

        for m in fused_modules(model):
            m.register_forward_hook(note_output)
        with memory.recompute() if recompute else contextlib.nullcontext():
            loss = model(x).sum()
        assert sum(ref() is not None for ref in outputs) == alive
        loss.backward()


def test_registry_lets_go_of_dead_outputs_and_their_inputs_without_gc():
    bn = fused_bn.BatchNormReLU2d(4)
    gc.disable()
    try:
        with memory.recompute():
            session = memory.active_session()
            h = torch.randn(2, 4, 3, 3, requires_grad=True) * 2  # the fused op's input
            output = bn(h)
            assert list(session.fused_outputs.values())[0].output() is output
            input_alive = weakref.ref(h)
            del h, output  # nothing saved them: both go now, without a gc pass
            assert not session.fused_outputs and input_alive() is None
    finally:
        gc.enable()


def test_recomputed_once_per_backward_and_dropped(monkeypatch):
    calls, recipes = [], []
    original = memory._Recipe.recompute

    def counting(recipe):
        calls.append(recipe)
        recipes.append(recipe)
        return original(recipe)

    monkeypatch.setattr(memory._Recipe, "recompute", counting)
    plain, recomputed, x = make_pair()
    with memory.recompute():
        loss = recomputed(x).sum()
    loss.backward(retain_graph=True)
    assert len(calls) == len(set(calls)) == 3  # bn_relu has 3 consumers, recomputed once
    assert all(recipe.output is None for recipe in recipes)
    loss.backward()
    assert len(calls) == 6
    assert all(recipe.output is None for recipe in recipes)


def test_retain_graph_and_autograd_grad():
    plain, recomputed, x = make_pair()

    def twice_then_grad(loss):
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        weight = [m for m in fused_modules(loss.model)][0].weight
        (grad,) = torch.autograd.grad(loss, weight)
        weight.grad.add_(grad)

    results = []
    for model, recompute in ((plain, False), (recomputed, True)):
        x_run = x.detach().clone().requires_grad_()
        with memory.recompute() if recompute else contextlib.nullcontext():
            loss = (model(x_run) ** 2).sum()
        loss.model = model
        twice_then_grad(loss)
        results.append((x_run, loss))
    (x_plain, loss_plain), (x_recomputed, loss_recomputed) = results
    assert_same_results(plain, recomputed, x_plain, x_recomputed, loss_plain, loss_recomputed)


def test_double_backward():
    plain, recomputed, x = make_pair()
    grads = []
    for model, recompute in ((plain, False), (recomputed, True)):
        with memory.recompute() if recompute else contextlib.nullcontext():
            loss = (model(x) ** 2).sum()
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        grads.append(torch.autograd.grad(grad_x.square().sum(), model.stem.weight)[0])
    assert torch.equal(*grads)


def forward_then_change(change):
    _, model, x = make_pair()
    with memory.recompute():
        h = model.stem(x)
        y = model.bn_relu(h)
        loss = model.conv_a(y).sum()
    change(model, h, y)
    return loss


@pytest.mark.parametrize("change", [
    pytest.param(lambda model, h, y: y.add_(1), id="output"),
    pytest.param(lambda model, h, y: y[0].mul_(2), id="output-view"),
    pytest.param(lambda model, h, y: h.mul_(2), id="input"),
])
def test_in_place_changes_after_saving_raise(change):
    loss = forward_then_change(change)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_parameters_changed_before_backward_raise():
    def step(model, h, y):
        with torch.no_grad():
            model.bn_relu.weight.add_(1)

    loss = forward_then_change(step)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_output_changed_before_saving_is_kept_as_it_is():
    plain, recomputed, x = make_pair()
    outputs = []
    for model, recompute in ((plain, False), (recomputed, True)):
        with memory.recompute() if recompute else contextlib.nullcontext():
            y = model.bn_relu(model.stem(x))
            y.mul_(3)  # from here on, the recipe would rebuild something else
            output = model.conv_a(y)
        output.sum().backward()
        outputs.append(output)
    assert torch.equal(*outputs)
    assert torch.equal(plain.stem.weight.grad, recomputed.stem.weight.grad)


def test_enclosing_hooks_receive_what_is_kept():
    plain, recomputed, x = make_pair()
    packed, unpacked = [], []

    def pack(tensor):
        packed.append(tensor.untyped_storage().data_ptr())
        return ("mine", tensor)

    def unpack(handle):
        unpacked.append(handle)
        return handle[1]

    out_plain, x_plain = run(plain, x, False)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out_recomputed, x_recomputed = run(recomputed, x, True)
    assert packed and len(unpacked) >= len(packed)
    assert_same_results(plain, recomputed, x_plain, x_recomputed, out_plain, out_recomputed)


def test_save_on_cpu():
    plain, recomputed, x = make_pair()
    out_plain, x_plain = run(plain, x, False)
    with torch.autograd.graph.save_on_cpu():
        out_recomputed, x_recomputed = run(recomputed, x, True)
    assert_same_results(plain, recomputed, x_plain, x_recomputed, out_plain, out_recomputed)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("recompute_inside", [True, False])
def test_checkpoint(use_reentrant, recompute_inside):
    plain, recomputed, x = make_pair()
    results = []
    for model, recompute in ((plain, False), (recomputed, True)):
        x_run = x.detach().clone().requires_grad_()

        def body(inputs, model=model, inner=recompute and recompute_inside):
            with memory.recompute() if inner else contextlib.nullcontext():
                return model.bn_act(model.conv_a(model.bn_relu(inputs)))

        outer = recompute and not recompute_inside
        with memory.recompute() if outer else contextlib.nullcontext():
            h = model.stem(x_run)
            y = torch.utils.checkpoint.checkpoint(body, h, use_reentrant=use_reentrant)
            output = model.conv_b(y)
        (output ** 2).sum().backward()
        results.append((output, x_run))
    (out_plain, x_plain), (out_recomputed, x_recomputed) = results
    assert torch.equal(out_plain, out_recomputed)
    assert torch.equal(x_plain.grad, x_recomputed.grad)
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        assert (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.equal(a.grad, b.grad)


def test_autocast():
    plain, recomputed, x = make_pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain, x_plain = run(plain, x, False)
        out_recomputed, x_recomputed = run(recomputed, x, True)
    assert_same_results(plain, recomputed, x_plain, x_recomputed, out_plain, out_recomputed)


def test_recompute_activations_wraps_forward_only():
    plain, recomputed, x = make_pair()
    keys = list(recomputed.state_dict())
    assert memory.recompute_activations(recomputed) is recomputed
    assert list(recomputed.state_dict()) == keys
    before, _ = saved_storages(plain, x, recompute=False)
    after, _ = saved_storages(recomputed, x, recompute=False)  # the model's own hooks
    assert sum(after.values()) < sum(before.values())
    memory.recompute_activations(recomputed, enabled=False)
    again, _ = saved_storages(recomputed, x, recompute=False)
    assert sum(again.values()) == sum(before.values())


def test_nested_blocks_and_session_closed():
    plain, recomputed, x = make_pair()
    out_plain, x_plain = run(plain, x, False)
    with memory.recompute():
        out_recomputed, x_recomputed = run(recomputed, x, True)
    assert memory.active_session() is None and memory.sessions_open == 0
    assert_same_results(plain, recomputed, x_plain, x_recomputed, out_plain, out_recomputed)


@pytest.mark.slow
def test_torch_compile_is_bypassed():
    """Under torch.compile the blocks do nothing (compiled graphs keep what AOTAutograd
    chose); a block around a compiled model still gives the same results."""
    plain, recomputed, x = make_pair()
    compiled_plain = torch.compile(plain)
    out_plain, x_plain = run(compiled_plain, x, False)
    compiled_wrapped = torch.compile(memory.recompute_activations(recomputed))
    out_recomputed, x_recomputed = run(compiled_wrapped, x, True)
    assert_same_results(plain, recomputed, x_plain, x_recomputed, out_plain, out_recomputed)


def ddp_scenario(rank, world_size):
    """Both ranks see the same batch, so DDP's averaged gradients are each rank's own."""
    plain, recomputed, x = make_pair()
    results = []
    for model in (plain, memory.recompute_activations(recomputed)):
        out, x_run = run(nn.parallel.DistributedDataParallel(model), x, False)
        grads = [p.grad for p in model.parameters()]
        results.append([out, x_run.grad, *grads, *model.buffers()])
    return results


def test_distributed_data_parallel(tmp_path):
    """DDP's gradient hooks and bucketed all-reduce on two gloo ranks, each in its own
    process (a process group in the test process would outlive a hang)."""
    for plain, recomputed in run_distributed(tmp_path, 2, ddp_scenario):
        assert len(plain) == len(recomputed)
        for a, b in zip(plain, recomputed):
            assert torch.equal(a, b)


def test_benchmark_recompute_variant_keeps_fewer_bytes():
    from benchmarks.models import MODELS, VARIANTS, saved_for_backward_bytes

    spec = MODELS["cnn"]
    torch.manual_seed(0)
    base = spec.build().train()
    x = torch.randn(spec.input_shape(8, 8))
    target = torch.randint(spec.classes, (8,))
    saved = {}
    for name in ("fused", "recompute"):
        model, _ = VARIANTS[name].prepare(copy.deepcopy(base))
        saved[name] = saved_for_backward_bytes(model, x, target)
    # The first two BN+ReLU outputs, [8, 16|32, 8, 8] float32, kept by the next
    # convolution and by max pooling; adaptive average pooling keeps nothing.
    assert saved["fused"] - saved["recompute"] == 4 * 8 * (16 * 64 + 32 * 64)
