// Host stand-in for the two c10 error macros lowrank_plan.cpp uses.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace emu_detail {
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
} // namespace emu_detail

#define TORCH_CHECK_VALUE(cond, ...)                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      throw std::invalid_argument(emu_detail::concat(__VA_ARGS__));    \
    }                                                                  \
  } while (0)

#define TORCH_CHECK(cond, ...)                                         \
  do {                                                                 \
    if (!(cond)) {                                                     \
      throw std::runtime_error(emu_detail::concat(__VA_ARGS__));       \
    }                                                                  \
  } while (0)
