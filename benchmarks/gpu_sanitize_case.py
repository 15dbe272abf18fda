"""A small run of every CUDA BatchNorm op over every kernel variant, for
compute-sanitizer (memcheck, racecheck); see benchmarks/gpu_check.sh.

Covers planar and rows layouts, wide (16-byte) and scalar elementwise access,
channel counts off the 32-channel tile, one and several blocks per channel,
and all four dtypes. Exits non-zero only on a Python error; the sanitizer
reports the rest.
"""

import torch

import fused_bn  # noqa: F401  (registers the ops)

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


def run(shape, memory_format, dtype, activation):
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    C = shape[1]
    weight = torch.rand(C, device="cuda", dtype=param_dtype) + 0.5
    bias = torch.randn(C, device="cuda", dtype=param_dtype)
    running_mean = torch.zeros(C, device="cuda", dtype=param_dtype)
    running_var = torch.ones(C, device="cuda", dtype=param_dtype)
    _, mean, invstd = ops.batch_norm_act(
        x, weight, bias, running_mean, running_var, True, 1e-5, activation
    )
    ops.batch_norm_act(x, weight, bias, running_mean, running_var, False, 1e-5, activation)
    ops.batch_norm_act_backward(dy, x, weight, bias, mean, invstd, True, activation)
    ops.batch_norm_act_backward(dy, x, None, None, mean, invstd, False, activation)
    ops.batch_norm_stats(x)
    ops.batch_norm_act_elemt(x, weight, bias, mean, invstd, activation)
    sum_dy, sum_dy_xmu = ops.batch_norm_act_backward_reduce(
        dy, x, weight, bias, mean, invstd, activation
    )
    count = x.numel() // C
    ops.batch_norm_act_backward_elemt(
        dy, x, weight, bias, mean, invstd, sum_dy / count, sum_dy_xmu / count, activation
    )


def main():
    for shape, memory_format in CASES:
        for dtype in DTYPES:
            for activation in ("identity", "relu"):
                run(shape, memory_format, dtype, activation)
    torch.cuda.synchronize()
    print(f"gpu_sanitize_case: {len(CASES) * len(DTYPES) * 2} cases run")


if __name__ == "__main__":
    main()
