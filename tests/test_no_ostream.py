"""No check of ours formats a number through std::ostream (csrc/check.h says why).

On the lent GPU image, ``std::ostream << int64_t`` (or ``double``) inside an extension
segfaults, so a TORCH_CHECK whose message holds a number ends the process instead of
raising. These tests fail when such formatting comes back, on any machine:

* the sources: no TORCH_CHECK, c10::str or string streams in csrc/ (checks go through
  ANCHOR_CHECK_* of csrc/check.h);
* at run time: the error tests run with std::ostream's numeric inserters interposed
  (support/ostream_trap.cpp, LD_PRELOAD); a call from anchor_ext's library ends the
  process, as it crashes on that image. (The binary still links the inserters: torch's
  header-inline checks, e.g. in at::parallel_for or the device guards, use them on
  their own error paths.)
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import anchor_ext

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
FORBIDDEN = {
    r"\bTORCH_CHECK\w*\s*\(": "TORCH_CHECK formats its message with c10::str (ostream)",
    r"\bTORCH_INTERNAL_ASSERT\w*\s*\(": "TORCH_INTERNAL_ASSERT formats its message with c10::str",
    r"\bc10::str\s*\(": "c10::str formats through std::ostringstream",
    r"\bstd::(o|i)?stringstream\b": "string streams format numbers through std::ostream",
    r"\bstd::(cout|cerr|clog)\b": "the standard streams format numbers through std::ostream",
    r"#include\s*<(sstream|iostream)>": "string/standard streams",
}


def _code_without_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def test_sources_use_the_ostream_free_checks():
    offenders = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".cpp", ".h", ".cu", ".cuh"):
            continue
        code = _code_without_comments(path.read_text())
        for pattern, why in FORBIDDEN.items():
            for match in re.finditer(pattern, code):
                line = code[:match.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(CSRC.parent)}:{line}: {match.group(0)!r} ({why})")
    assert not offenders, "use ANCHOR_CHECK_* (csrc/check.h):\n" + "\n".join(offenders)


TRAP_SOURCE = pathlib.Path(__file__).resolve().parent / "support" / "ostream_trap.cpp"
TRAP_EXIT = 86


@pytest.fixture(scope="module")
def ostream_trap(tmp_path_factory):
    """The LD_PRELOAD library of support/ostream_trap.cpp, built with the host compiler."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("needs a C++ compiler to build the ostream trap")
    library = tmp_path_factory.mktemp("trap") / "ostream_trap.so"
    subprocess.run([cxx, "-O1", "-shared", "-fPIC", str(TRAP_SOURCE), "-o", str(library), "-ldl"],
                   check=True)
    return library


def _run_trapped(library, trapped, code):
    env = {**os.environ, "LD_PRELOAD": str(library), "ANCHOR_TRAP_LIBRARY": str(trapped)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600, cwd=pathlib.Path(__file__).resolve().parent)


def test_trap_catches_ostream_formatting(ostream_trap, tmp_path):
    """Control: a library that formats a number through ostream is caught by the trap."""
    source = tmp_path / "formats.cpp"
    source.write_text('#include <sstream>\n#include <string>\nextern "C" int format_number() '
                      '{ std::ostringstream os; os << long(42); return int(os.str().size()); }\n')
    library = tmp_path / "libformats.so"
    subprocess.run([shutil.which("c++") or "g++", "-shared", "-fPIC", str(source), "-o", str(library)],
                   check=True)
    run = _run_trapped(ostream_trap, library,
                       f"import ctypes; ctypes.CDLL({str(library)!r}).format_number()")
    assert run.returncode == TRAP_EXIT and "ostream_trap" in run.stderr, run.stderr


def test_error_checks_do_not_format_through_ostream(ostream_trap):
    """Every check of the error tests fails, under the trap, as a Python exception."""
    library = os.path.realpath(anchor_ext._C.__file__)
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
            "'test_errors.py', 'test_no_ostream.py::test_messages_still_hold_the_numbers']))")
    run = _run_trapped(ostream_trap, library, code)
    assert run.returncode == 0, (f"exit {run.returncode} (86: the trap fired)\n{run.stdout[-3000:]}"
                                 f"\n{run.stderr[-3000:]}")


def test_messages_still_hold_the_numbers():
    """The formatter gives what c10::str gave: integers, doubles, shapes, dtypes."""
    import torch

    q = torch.zeros(1, 4, 64, 64)
    with pytest.raises(ValueError, match=r"Hq=4 and Hkv=3"):
        anchor_ext.prefill(q, torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"sm_scale: .* got 1e\+40$"):
        anchor_ext.prefill(q, q, q, sm_scale=1e40)
    with pytest.raises(ValueError, match=r"sm_scale: .* got -0\.5$"):
        anchor_ext.prefill(q, q, q, sm_scale=-0.5)
    with pytest.raises(ValueError, match=r"got shape \[4, 64, 64\]"):
        anchor_ext.prefill(q[0], q, q)
    with pytest.raises(ValueError, match=r"got strides \[8192, 8192, 128, 2\]"):
        anchor_ext.prefill(torch.zeros(1, 1, 64, 128)[..., ::2], q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match=r"expected dtype Float \(the dtype of q\), got Half"):
        anchor_ext.prefill(q, q.half(), q)
