#include "prefault.h"

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace lowrank_ext {
namespace {

#if defined(__linux__)
// From linux/mman.h, for C libraries whose headers predate it.
constexpr int kMadvPopulateWrite = 23;
#endif

bool initially_enabled() {
  const char* env = std::getenv("LOWRANK_EXT_PREFAULT");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// Cleared for good once the kernel answers that it does not know the advice.
std::atomic<bool> g_enabled{initially_enabled()};

} // namespace

bool prefault_enabled() {
  return g_enabled.load(std::memory_order_relaxed);
}

void set_prefault_enabled(bool enabled) {
  g_enabled.store(enabled, std::memory_order_relaxed);
}

void prefault_for_write(void* data, int64_t bytes) {
#if defined(__linux__)
  if (bytes < kPrefaultMinBytes || !prefault_enabled()) {
    return;
  }
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(page - 1);
  if (end <= begin) {
    return;
  }
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(begin), page, &resident) != 0 || (resident & 1) != 0) {
    return;
  }
  if (madvise(reinterpret_cast<void*>(begin), end - begin, kMadvPopulateWrite) != 0 &&
      errno == EINVAL) {
    g_enabled.store(false, std::memory_order_relaxed);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

} // namespace lowrank_ext
