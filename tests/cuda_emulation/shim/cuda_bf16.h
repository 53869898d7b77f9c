// Host stand-in for CUDA's cuda_bf16.h: the __nv_bfloat16 storage type with
// round-to-nearest-even conversions.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits = 0;
  __nv_bfloat16() = default;
  __nv_bfloat16(float value) { // NOLINT: implicit, as in CUDA
    uint32_t u;
    std::memcpy(&u, &value, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0; // NaN stays NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u); // ties to even
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  operator float() const { // NOLINT: implicit, as in CUDA
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &u, sizeof(value));
    return value;
  }
};

inline float __bfloat162float(__nv_bfloat16 v) {
  return static_cast<float>(v);
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  return __nv_bfloat16(v);
}

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) {
  return v.bits;
}
