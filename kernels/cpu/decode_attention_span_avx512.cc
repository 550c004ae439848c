// The avx512 build of the CPU decode-attention inner loop (flags in kernels/CMakeLists.txt).
#define FERRY_SIMD_NAMESPACE avx512
#define FERRY_SIMD_WIDTH 16
#include "decode_attention_span.inc"
