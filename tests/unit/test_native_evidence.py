"""Evidence about the C ladder itself, from its own source built in a temporary
directory with the evidence switches of _native.c (tests/native/harness.c):

* the constant-time check: valgrind memcheck over the portable build (valgrind
  cannot execute AVX-512), with the scalar and a probe's input marked undefined;
  any branch or memory index that depends on them fails it, and two control cases
  show that such a branch and such an index are caught;
* the bound-checking build: every documented limb bound asserted after every
  field operation, on random and extreme inputs, with the real AVX-512 IFMA code
  (where the CPU has it) and the portable stand-in, results equal to cryptography's;
* the wipes: the built module still calls explicit_bzero where the source wipes.

`make test` installs valgrind from Debian where it can; without it the
constant-time check skips and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ispf.hazmat import curve
from ispf.hazmat.backends import CryptographyBackend, cpu_has_ifma, edge_values

ROOT = Path(__file__).resolve().parents[2]
HAZMAT = ROOT / "common" / "ispf" / "hazmat"
HARNESS = ROOT / "tests" / "native" / "harness.c"
Build = Callable[[str, list[str]], Path]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    if os.environ.get("ISPF_NATIVE", "1") == "0":
        pytest.skip("ISPF_NATIVE=0 (make pytest-portable): these ran in the main pass")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler here: the native ladder is not built either")
    where = tmp_path_factory.mktemp("ladder")
    built: dict[str, Path] = {}

    def make(name: str, flags: list[str]) -> Path:
        if name not in built:
            out = where / name
            cmd = [cc, "-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
            cmd += ["-Wno-unused-function", *flags, "-I", str(HAZMAT), str(HARNESS), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                pytest.fail(f"building the {name} harness failed:\n{done.stderr}")
            built[name] = out
        return built[name]

    return make


def _valgrind() -> str:
    vg = shutil.which("valgrind")
    if vg is None:
        pytest.skip(
            "valgrind is not installed: the X25519 constant-time check is skipped "
            "(make test installs it: apt-get install valgrind)"
        )
    return vg


def _memcheck(build: Build, mode: str) -> subprocess.CompletedProcess[str]:
    exe = build("ct", ["-g", "-DISPF_PORTABLE_IFMA", "-DISPF_CT_CHECK"])  # (-g: lines in reports)
    cmd = [_valgrind(), "--tool=memcheck", "--error-exitcode=99", "-q", str(exe), mode]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


SECRET_USE = re.compile(
    r"Conditional jump or move depends on uninitialised|Use of uninitialised value"
)


@pytest.mark.parametrize("mode", ["blind", "probe"])
def test_the_ladder_has_no_secret_dependent_branch_or_index(build: Build, mode: str) -> None:
    """blind: the scalar is secret; probe: the scalar and the input values."""
    done = _memcheck(build, mode)
    assert not SECRET_USE.search(done.stderr), done.stderr
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{mode}: 40 values")


@pytest.mark.parametrize(
    ("mode", "report"),
    [
        ("control-branch", "Conditional jump or move depends on uninitialised value"),
        ("control-index", "Use of uninitialised value of size"),
    ],
)
def test_the_constant_time_check_catches_a_secret_branch_and_index(
    build: Build, mode: str, report: str
) -> None:
    done = _memcheck(build, mode)
    assert done.returncode == 99, done.stderr
    assert report in done.stderr


def _extreme_inputs() -> bytes:
    values = [*edge_values(), 2**255 - 1, 2**255 - 21, 2**254, 2**52 - 1]
    values += [v | 2**255 for v in edge_values()[:32]]  # the ignored top bit set
    return b"".join(v.to_bytes(32, "little") for v in values) + os.urandom(32 * 1000)


@pytest.mark.parametrize("variant", ["portable", "ifma"])
def test_bound_checking_build_on_random_and_extreme_inputs(build: Build, variant: str) -> None:
    flags = ["-DISPF_CHECK_BOUNDS"]
    if variant == "portable":
        flags.append("-DISPF_PORTABLE_IFMA")
    elif not cpu_has_ifma():
        pytest.skip("the CPU lacks AVX-512 IFMA (the portable variant still runs)")
    exe = build(f"bounds-{variant}", flags)
    values = _extreme_inputs()
    for scalar in (os.urandom(32), bytes(32), b"\xff" * 32):
        done = subprocess.run([str(exe), "run"], input=scalar + values, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout == CryptographyBackend().many(scalar, values, 32)
    # and a refusal, by position
    bad = values[:320] + bytes(32) + values[320:]
    done = subprocess.run([str(exe), "run"], input=bytes(32) + bad, capture_output=True)
    assert (done.returncode, done.stderr) == (3, b"low-order input at 10\n")


# Where _native.c wipes secrets (secure_wipe), by function: the clamped scalar and
# the heap state (ifma_run, and once more on its out-of-memory path), the limbs of
# each ladder call, the hashing key and the raw IDs. At least these many calls of
# explicit_bzero must survive the compiler in each function of the built module.
WIPES = {"ifma_run": 2, "ladder_lanes": 1, "ladder_finish": 1, "py_hash_to_curve_many": 2}


def test_the_wipes_survive_in_the_built_module() -> None:
    if curve.native is None:
        pytest.skip("the native module is not built here")
    objdump = shutil.which("objdump")
    if objdump is None or not sys.platform.startswith("linux"):
        pytest.skip("objdump (binutils) is needed to read the built module's code")
    if os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.skip("not glibc: the wipes are volatile stores, not explicit_bzero calls")
    text = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(curve.native.__file__)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    calls: Counter[str] = Counter()
    function = ""
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <([^>]+)>:$", line)
        if head:
            function = head.group(1).split(".")[0]  # (gcc's .isra / .constprop clones)
        elif re.search(r"\bcall.*<_*explicit_bzero", line):
            calls[function] += 1
    missing = {f: n for f, n in WIPES.items() if calls[f] < n}
    assert not missing, f"wipes removed from the built module: {missing} (found {dict(calls)})"
