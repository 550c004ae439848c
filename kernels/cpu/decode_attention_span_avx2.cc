// The avx2 build of the CPU decode-attention inner loop (flags in kernels/CMakeLists.txt).
#define FERRY_SIMD_NAMESPACE avx2
#define FERRY_SIMD_WIDTH 8
#include "decode_attention_span.inc"
