// Portable build of the expert activation kernels (no ISA assumptions).
#define SOME_ACT_KERNELS_NAME kernels_default
#include "expert_act_impl.h"
