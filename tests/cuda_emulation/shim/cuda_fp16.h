// Host stand-in for CUDA's cuda_fp16.h: the __half storage type with
// round-to-nearest-even conversions (through the compiler's _Float16).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits = 0;
  __half() = default;
  __half(float value) { // NOLINT: implicit, as in CUDA
    const _Float16 h = static_cast<_Float16>(value);
    std::memcpy(&bits, &h, sizeof(bits));
  }
  operator float() const { // NOLINT: implicit, as in CUDA
    _Float16 h;
    std::memcpy(&h, &bits, sizeof(bits));
    return static_cast<float>(h);
  }
};

inline float __half2float(__half v) {
  return static_cast<float>(v);
}

inline __half __float2half_rn(float v) {
  return __half(v);
}

inline unsigned short __half_as_ushort(__half v) {
  return v.bits;
}
