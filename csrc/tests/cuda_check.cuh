// Shared by the self-tests: abort with a clear message on any CUDA error.
#pragma once
#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#define CUDA_OK(expr)                                                                                        \
  do {                                                                                                       \
    cudaError_t err_ = (expr);                                                                               \
    if (err_ != cudaSuccess) {                                                                               \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), __FILE__, __LINE__,      \
                   cudaGetErrorString(err_));                                                                \
      std::exit(1);                                                                                          \
    }                                                                                                        \
  } while (0)
