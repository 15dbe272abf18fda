#pragma once
// Lets the math headers compile for host (C++) and device (CUDA) alike.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSED_BN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSED_BN_HOST_DEVICE inline
#endif
