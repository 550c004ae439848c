// Element types of tensors that Ferry stores or moves (KV cache, activations, wire payloads).
//
// The numeric values are part of the wire format and of checkpoints' metadata mapping:
// append only, never renumber. Conversions are host+device so CPU and CUDA code share them.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#if defined(__CUDACC__)
#define FERRY_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FERRY_HOST_DEVICE inline
#endif

namespace ferry {

enum class DType : uint8_t {
  kFloat32 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
};

constexpr int DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

constexpr std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "fp32";
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
  }
  return "unknown";
}

// Parses "fp32"/"float32", "fp16"/"float16", "bf16"/"bfloat16". Returns false on anything else.
inline bool ParseDType(std::string_view name, DType* out) {
  if (name == "fp32" || name == "float32") { *out = DType::kFloat32; return true; }
  if (name == "fp16" || name == "float16") { *out = DType::kFloat16; return true; }
  if (name == "bf16" || name == "bfloat16") { *out = DType::kBFloat16; return true; }
  return false;
}

// Scalar conversions for host code and references. Vectorised kernels convert in bulk instead.
inline float BFloat16BitsToFloat(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t FloatToBFloat16Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float Float16BitsToFloat(uint16_t bits);
uint16_t FloatToFloat16Bits(float value);

// Host arrays: n float32 values to `dtype` (rounded to nearest even), and `dtype` values to
// float32 (exact). dst holds n elements of its type; src and dst must not overlap.
void FloatsToDType(const float* src, int64_t n, DType dtype, void* dst);
void DTypeToFloats(const void* src, int64_t n, DType dtype, float* dst);

}  // namespace ferry
