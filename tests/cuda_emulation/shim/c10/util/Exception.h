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

#define EMU_CHECK(exception, cond, ...)                              \
  do {                                                               \
    if (!(cond)) {                                                   \
      throw exception(emu_detail::concat(__VA_ARGS__));              \
    }                                                                \
  } while (0)

#define TORCH_CHECK_VALUE(cond, ...) EMU_CHECK(std::invalid_argument, cond, __VA_ARGS__)
#define TORCH_CHECK(cond, ...) EMU_CHECK(std::runtime_error, cond, __VA_ARGS__)
