"""Why `std::ostream << int64_t` crashes inside extensions on the lent GPU image.

    python3 bench/diagnose_ostream.py > diagnose_ostream.log 2>&1

Builds a two-function `load_inline` extension (format a string, format an int64 through
std::ostringstream), calls each in a child process, and reports: the exit status of
each call; which shared object every ostream / locale symbol the extension uses is bound
to (LD_DEBUG=bindings); every loaded library that exports its own
`std::ostream::_M_insert<long>` or `std::locale::id`s (a second libstdc++ copy); and the
libstdc++ files mapped into the process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <sstream>
#include <string>
std::string format_string(const std::string& s) { std::ostringstream os; os << s; return os.str(); }
std::string format_int64(int64_t x) { std::ostringstream os; os << x; return os.str(); }
"""

CHILD = r"""
import sys, torch
from torch.utils.cpp_extension import load_inline
m = load_inline("ostream_probe", cpp_sources=[{src!r}], functions=["format_string", "format_int64"],
                build_directory={build!r}, verbose=False, extra_ldflags={ldflags!r})
print("so:", m.__file__, flush=True)
if {call!r} == "maps":
    libs = sorted({{line.split()[-1] for line in open("/proc/self/maps") if ".so" in line}})
    print("\n".join(libs), flush=True)
elif {call!r} == "string":
    print("format_string ->", m.format_string("abc"), flush=True)
else:
    print("format_int64 ->", m.format_int64(5), flush=True)
"""


# Link variants: the toolchain's default, its static libstdc++ copy's symbols kept local
# to the extension, and the system's shared libstdc++ (the one torch loads) named first.
VARIANTS = {
    "default": [],
    "exclude_libs": ["-Wl,--exclude-libs,ALL"],
    "shared_system_libstdcxx": ["-L/usr/lib/x86_64-linux-gnu", "-l:libstdc++.so.6"],
}


def child(build, call, env=None, ldflags=()):
    code = CHILD.format(src=SOURCE, build=build, call=call, ldflags=list(ldflags))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def variant_results():
    """Build each link variant and format an int64 with it, each in its own process."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        name, flags = item
        build = tempfile.mkdtemp(prefix=f"ostream_{name}_")
        built = child(build, "string", ldflags=flags)
        run = child(build, "int64", ldflags=flags)
        return name, flags, built.returncode, run.returncode, run.stdout.strip()[-80:]

    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        for name, flags, built, rc, out in pool.map(one, VARIANTS.items()):
            print(f"variant {name} {flags}: string call exit {built}, int64 call exit {rc} ({out!r})")


def main():
    print("c++ is", shutil.which("c++"), "; CXX =", os.environ.get("CXX"))
    for query in ("libstdc++.so", "libstdc++.a"):
        found = subprocess.run(["c++", f"-print-file-name={query}"], capture_output=True, text=True)
        print(f"c++ -print-file-name={query}: {found.stdout.strip()}")
    variant_results()
    build = tempfile.mkdtemp(prefix="ostream_probe_")
    maps = child(build, "maps")  # builds the extension once
    print("build/maps exit", maps.returncode, maps.stderr[-2000:])
    libs = [line for line in maps.stdout.splitlines() if line.startswith("/")]
    so = next((line.split(": ", 1)[1] for line in maps.stdout.splitlines() if line.startswith("so:")), None)
    print("libstdc++ / libgcc mapped:", [lib for lib in libs if "stdc++" in lib or "libgcc" in lib])
    for call in ("string", "int64"):
        run = child(build, call)
        print(f"call {call}: exit {run.returncode}; stdout {run.stdout.strip()[-300:]!r}; "
              f"stderr {run.stderr.strip()[-500:]!r}")
    run = child(build, "int64", env={"LD_DEBUG": "bindings"})
    wanted = ("_M_insert", "ostringstream", "num_put", "locale", "basic_ostream", "ios_base")
    lines = [line for line in run.stderr.splitlines()
             if "binding file" in line and (so and os.path.basename(so) in line)
             and any(w in line for w in wanted)]
    print(f"LD_DEBUG bindings from the probe ({len(lines)} lines):")
    print("\n".join(lines[:60]))
    print("libraries exporting their own ostream/locale symbols:")
    for lib in libs:
        if not os.path.exists(lib):
            continue
        nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True)
        own = [s for s in ("_ZNSo9_M_insertIlEERSoT_", "_ZNSt6locale2id", "_ZNSt7num_put",
                           "_ZNSt7__cxx1119basic_ostringstream") if s in nm.stdout]
        if own:
            print(f"  {lib}: {own}")


if __name__ == "__main__":
    main()
