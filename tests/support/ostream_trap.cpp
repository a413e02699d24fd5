// LD_PRELOAD trap for tests/test_no_ostream.py: std::ostream's numeric inserters,
// interposed; a call whose return address lies in the library named by
// $ANCHOR_TRAP_LIBRARY ends the process with exit code 86 (the lent GPU image
// segfaults there, csrc/check.h says why), any other call goes to libstdc++.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

bool called_from_trapped_library(void* return_address) {
  static const char* trapped = std::getenv("ANCHOR_TRAP_LIBRARY");
  Dl_info info;
  return trapped != nullptr && dladdr(return_address, &info) != 0 && info.dli_fname != nullptr &&
         std::strcmp(info.dli_fname, trapped) == 0;
}

[[noreturn]] void trap(const char* symbol) {
  std::fprintf(stderr, "ostream_trap: %s (a number formatted through std::ostream) called from %s\n",
               symbol, std::getenv("ANCHOR_TRAP_LIBRARY"));
  std::fflush(stderr);
  std::_Exit(86);
}

}  // namespace

#define ANCHOR_TRAP(symbol, T)                                                    \
  extern "C" void* symbol(void* stream, T value) {                                \
    if (called_from_trapped_library(__builtin_return_address(0))) trap(#symbol);  \
    using Real = void* (*)(void*, T);                                             \
    static const Real real = reinterpret_cast<Real>(dlsym(RTLD_NEXT, #symbol));   \
    return real(stream, value);                                                   \
  }

ANCHOR_TRAP(_ZNSo9_M_insertIlEERSoT_, long)                // operator<<(long), int64_t
ANCHOR_TRAP(_ZNSo9_M_insertImEERSoT_, unsigned long)       // operator<<(unsigned long)
ANCHOR_TRAP(_ZNSo9_M_insertIxEERSoT_, long long)           // operator<<(long long)
ANCHOR_TRAP(_ZNSo9_M_insertIyEERSoT_, unsigned long long)  // operator<<(unsigned long long)
ANCHOR_TRAP(_ZNSo9_M_insertIdEERSoT_, double)              // operator<<(double), (float)
ANCHOR_TRAP(_ZNSo9_M_insertIbEERSoT_, bool)                // operator<<(bool)
ANCHOR_TRAP(_ZNSolsEi, int)                                // operator<<(int)
ANCHOR_TRAP(_ZNSolsEs, short)                              // operator<<(short)
