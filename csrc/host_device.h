// Function qualifiers shared by the host/device headers (non_target.h, optim_update.h):
// under nvcc their functions compile for both the CPU and the GPU; elsewhere they are
// plain inline C++. No torch headers.
#pragma once

#if defined(__CUDACC__)
#define FM_HOST_DEVICE __host__ __device__
#define FM_FORCE_INLINE __forceinline__
#else
#define FM_HOST_DEVICE
#if defined(__GNUC__)
#define FM_FORCE_INLINE inline __attribute__((always_inline))
#else
#define FM_FORCE_INLINE inline
#endif
#endif
