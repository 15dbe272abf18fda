"""A small run of every CUDA BatchNorm op over every kernel variant, for
compute-sanitizer (memcheck, racecheck); see benchmarks/gpu_check.sh.

Covers planar and rows layouts, wide (16-byte) and scalar elementwise access,
channel counts off the 32-channel tile, one and several blocks per channel,
all four dtypes, and with FUSED_BN_CUDA_KERNELS=next every activation and the
residual add (without it, identity and ReLU: the ops refuse the others on CUDA).
Exits non-zero only on a Python error; the sanitizer reports the rest.

    python benchmarks/gpu_sanitize_case.py [--device cpu]

--device cpu runs the same calls on CPU: a check, without a GPU, that they meet
the ops' schemas (tests/test_cuda_dry_run.py).
"""

import argparse

import torch

import fused_bn

ops = torch.ops.fused_bn

CASES = [
    ((32, 6, 16, 16), torch.contiguous_format),  # planar, wide, several blocks per channel
    ((3, 5, 7, 7), torch.contiguous_format),  # planar, odd inner: scalar access
    ((4, 40, 5, 3), torch.channels_last),  # rows, C % 8 == 0, C off the tile
    ((2, 7, 3, 5), torch.channels_last),  # rows, odd C: scalar access
    ((512, 40), torch.contiguous_format),  # rows, several blocks per channel
    ((2, 8, 3, 4, 5), torch.channels_last_3d),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (activation, activation_params, with a residual)
VERIFIED = [("identity", [], False), ("relu", [], False)]
NEXT = VERIFIED + [
    ("relu6", [], False), ("hardtanh", [-0.5, 0.8], False), ("leaky_relu", [0.2], False),
    ("silu", [], False), ("hardswish", [], False), ("elu", [0.7], False),
    ("relu", [], True), ("silu", [], True),
]


def run(shape, memory_format, dtype, activation, params, with_residual, device):
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x)
    residual = torch.randn_like(x) if with_residual else None
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    C = shape[1]
    weight = torch.rand(C, device=device, dtype=param_dtype) + 0.5
    bias = torch.randn(C, device=device, dtype=param_dtype)
    running_mean = torch.zeros(C, device=device, dtype=param_dtype)
    running_var = torch.ones(C, device=device, dtype=param_dtype)
    batches = torch.zeros((), dtype=torch.long, device=device)
    act = (activation, params)
    _, mean, invstd = ops.batch_norm_act(
        x, weight, bias, running_mean, running_var, batches, True, 0.1, 1e-5, *act, residual
    )
    ops.batch_norm_act(
        x, weight, bias, running_mean, running_var, None, False, 0.1, 1e-5, *act, residual
    )
    ops.batch_norm_act_backward(dy, x, weight, bias, mean, invstd, True, *act, residual)
    ops.batch_norm_act_backward(dy, x, None, None, mean, invstd, False, *act, residual)
    ops.batch_norm_stats(x)
    ops.batch_norm_act_elemt(x, weight, bias, mean, invstd, *act)
    sum_dy, sum_dy_xmu = ops.batch_norm_act_backward_reduce(
        dy, x, weight, bias, mean, invstd, *act
    )
    count = x.numel() // C
    ops.batch_norm_act_backward_elemt(
        dy, x, weight, bias, mean, invstd, sum_dy / count, sum_dy_xmu / count, *act
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = parser.parse_args().device
    next_kernels = device == "cpu" or fused_bn.build_info()["cuda_kernels"] == "next"
    activations = NEXT if next_kernels else VERIFIED
    for shape, memory_format in CASES:
        for dtype in DTYPES:
            for activation, params, with_residual in activations:
                run(shape, memory_format, dtype, activation, params, with_residual, device)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_sanitize_case: {len(CASES) * len(DTYPES) * len(activations)} cases run on "
          f"{device}")


if __name__ == "__main__":
    main()
