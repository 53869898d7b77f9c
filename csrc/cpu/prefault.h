// Faulting in a fresh output buffer with one system call instead of one page
// fault per 4 KB page.
//
// Large outputs (here from 32 MB, glibc's largest mmap threshold) come from a
// fresh anonymous mapping on every call, and the first write to each of its
// pages traps into the kernel. On a 2-core VM that is about 1 µs per page:
// 8 ms of a 32 MB output's 18 ms. madvise(MADV_POPULATE_WRITE) (Linux 5.14)
// maps the same zeroed pages in one call for about two thirds of that. It
// changes neither the allocation (torch's allocator, the same pages, the same
// page size) nor the contents.
#pragma once

#include <cstdint>

namespace lowrank_ext {

// Maps the pages that lie wholly inside [data, data + bytes) for writing,
// when the range is at least kPrefaultMinBytes and its first whole page is
// not mapped yet (memory reused from the heap is mapped already: walking it
// again would only cost time). Best effort: does nothing where the kernel
// lacks MADV_POPULATE_WRITE, off Linux, or on any error.
void prefault_for_write(void* data, int64_t bytes);

// Whether prefault_for_write does anything: on unless LOWRANK_EXT_PREFAULT=0,
// and off for good once the kernel turned MADV_POPULATE_WRITE down.
bool prefault_enabled();
// For tests and benchmarks that measure what it saves.
void set_prefault_enabled(bool enabled);

constexpr int64_t kPrefaultMinBytes = int64_t{1} << 20;

} // namespace lowrank_ext
