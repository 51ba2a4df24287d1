"""The Gluon kernels (kernels/prefill_sm90, decode_sm90, mla_sm90) build for sm_90 on the CPU.

The interpreter cannot run Gluon, so the CPU tests exercise these kernels' host paths only; the GPU tests run
them. A shared helper that changes its signature then leaves a kernel that nothing on the CPU compiles broken
until the next GPU run of its tests: mla_sm90 called prefill_sm90's _ws_item and _softmax_block with their old
arguments from session 30 (e7e6552) to session 34. This compiles scripts/compile_check.py's CI_CASES, one case
per constexpr branch of each kernel, through Triton's sm_90 compiler (ptxas included) in a subprocess without
TRITON_INTERPRET (the interpreter replaces the @triton.jit helpers the Gluon kernels call)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import compile_check  # noqa: E402

from pagoda.attention.kernels import decode_sm90  # noqa: E402

PARTS = 2  # the cases in this many subprocesses (~50 s of compiling in all on the CI machine)
SM90_MAX_SHARED = 227 * 1024  # bytes of shared memory one CTA may use on sm_90 (opt-in maximum)


def test_ci_cases_name_each_gluon_kernel():
    kernels = {name.split()[0] for name in compile_check.CI_CASES}
    assert kernels == {"prefill_sm90_ws", "decode_sm90", "mla_sm90"}
    assert len(set(compile_check.CI_CASES)) == len(compile_check.CI_CASES)


@pytest.mark.skipif(not decode_sm90.HAVE_GLUON, reason="this Triton has no Gluon")
@pytest.mark.parametrize("part", range(PARTS))
def test_gluon_kernels_compile_for_sm90(part):
    names = compile_check.CI_CASES[part::PARTS]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_check.py"), "--exact", *names], env=env,
                       capture_output=True, text=True, timeout=1200)
    lines = r.stdout.splitlines()
    failed = [ln for ln in lines if ln.startswith("FAIL")]
    # (a failure's text: the source around the call, then after "<-" the error that stopped it)
    assert r.returncode == 0 and not failed, r.stdout[-6000:] + r.stderr[-3000:]
    ok = [ln for ln in lines if ln.startswith("ok   ")]
    assert len(ok) == len(names), r.stdout[-3000:]
    for name in names:  # each built with its shared-memory ring (more than 16 KB: K / V stages), within the
        # 227 KB a CTA may take on sm_90 (the MLA kernel's 64-token ring leaves 1.6 KB: a launch past it fails
        # only on the GPU, with "out of resources")
        line = next(ln for ln in ok if ln.startswith(f"ok   {name}:"))
        assert " B shared" in line, line
        assert 16384 < int(line.split(": ", 1)[1].split(" B shared")[0]) <= SM90_MAX_SHARED, line
