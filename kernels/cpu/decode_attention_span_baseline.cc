// The baseline build of the CPU decode-attention inner loop (flags in kernels/CMakeLists.txt).
#define FERRY_SIMD_NAMESPACE baseline
#define FERRY_SIMD_WIDTH 4
#include "decode_attention_span.inc"
