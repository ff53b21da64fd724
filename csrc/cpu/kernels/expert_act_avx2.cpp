// AVX2+FMA build of the expert activation kernels. CMake compiles this file
// with -mavx2 -mfma -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 so that ATen's
// Vectorized<float> is 8 lanes wide here; it is only called after a run-time
// check that the CPU has AVX2 and FMA.
#define SOME_ACT_KERNELS_NAME kernels_avx2
#include "expert_act_impl.h"
