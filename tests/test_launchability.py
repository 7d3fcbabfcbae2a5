"""Every block configuration the Triton launchers choose for HRNetV2-W18/W48 launches on sm_80 and sm_90, and
every kernel code path compiles (hrfast.perf.launchability), without a GPU.

The whole check runs in a subprocess: it compiles with Triton's real compiler, which this suite replaces with
the interpreter (conftest.py). Cold (an empty compile cache, as in CI) it takes about 7 minutes on two idle
cores (one process per target); warm (HRFAST_PERF_CACHE filled by an earlier run) under a minute, spent
recording. The other tests check its rules on made-up compiler facts.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from hrfast.perf import launchability as L
from hrfast.perf.arch import A100, H100
from hrfast.perf.compile import Compiled
from hrfast.perf.record import Launch


@pytest.mark.skipif(torch.cuda.is_available(), reason="minutes of compiling for other targets: on a GPU machine "
                                                      "the suite runs the kernels for real instead")
def test_every_configuration_launches_on_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default
    proc = subprocess.run([sys.executable, "-m", "hrfast.perf.launchability", "--jobs", "2"], env=env,
                          capture_output=True, text=True, timeout=1500)
    output = f"{proc.stdout[-20000:]}\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, f"a kernel configuration cannot launch or does not compile:\n{output}"
    summary = re.search(r"launchability: (\d+) configuration variants and (\d+) further code paths for sm_80 "
                        r"sm_90: 0 failing", proc.stdout)
    assert summary and int(summary.group(1)) >= 500 and int(summary.group(2)) >= 100, output


def test_configurations_cover_models_modes_dtypes_layouts():
    configs = L.configurations(L.MODELS, L.DTYPES)
    assert {(c.model, c.mode, c.dtype, c.channels_last) for c in configs} == {
        (m, mode, d, cl) for m in ("hrnetv2_w18_seg", "hrnetv2_w48_seg") for mode in ("inference", "training")
        for d in ("fp32", "fp16", "bf16") for cl in (False, True)}
    assert {(c.size, c.batch) for c in configs} == {((512, 1024), 2)}


def test_exceptions_name_a_reason_and_never_excuse_launch_failures():
    assert L.EXCEPTIONS
    for (kernel, check), reason in L.EXCEPTIONS.items():
        assert check in ("spills", "occupancy") and kernel.startswith("_") and len(reason) > 40


# ------------------------------------------------------------------------------------ the rules, on fakes

LOOP_SPILL_SASS = """
        code for sm_90
                Function : {name}
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0030*/                   {inside} R5, [R1] ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
"""
STRAIGHT_SASS = """
                Function : {name}
        /*0000*/                   STL [R1], R2 ;
        /*0010*/                   EXIT ;
        /*0020*/                   BRA 0x20;
"""


def fake(name="_fuse_forward_kernel", registers=40, shared=0, spills=0, sass="", num_warps=4) -> Compiled:
    return Compiled(name=name, sm=90, registers=registers, spill_stores=spills, spill_loads=spills, stack=spills,
                    shared=shared, num_warps=num_warps, sass=sass.format(name=name, inside="LDL"))


def fake_launch(name="_fuse_forward_kernel") -> Launch:
    return Launch(fn=SimpleNamespace(__name__=name, fn=lambda: None), grid=(1,), args=(), kwargs={})


def checks(compiled: Compiled, arch=H100, performance=True) -> list:
    return [name for name, _ in L.check(arch, fake_launch(compiled.name), compiled, performance)]


def test_clean_variant_passes():
    assert checks(fake()) == []


def test_shared_memory_over_the_limit_fails():
    issue_bound = "_some_issue_bound_kernel"
    assert checks(fake(issue_bound, shared=200_000), H100) == []
    assert checks(fake(issue_bound, shared=200_000), A100) == ["shared"]
    assert checks(fake(shared=240_000), H100, performance=False) == ["shared"]


def test_spills_count_only_where_the_kernel_runs():
    name = "_some_kernel_without_an_entry"  # in no trip table: no `trips` check
    assert checks(fake(name, spills=8, sass=LOOP_SPILL_SASS)) == ["spills"]  # an LDL in the loop
    prologue_only = LOOP_SPILL_SASS.replace("{inside}", "IADD3")
    assert checks(fake(name, spills=8, sass=prologue_only)) == []  # the STL before the loop runs once
    assert checks(fake(name, spills=8, sass=STRAIGHT_SASS)) == ["spills"]  # no loop: the whole kernel is the hot path
    assert checks(fake(name, spills=8, sass=STRAIGHT_SASS), performance=False) == []


def test_occupancy_rule_is_for_memory_bound_kernels():
    """100 KB of shared memory leaves room for one 4-warp block per SM on an A100."""
    assert checks(fake(shared=100_000), A100) == ["occupancy"]
    assert checks(fake("_upsample_adjoint_kernel", shared=100_000), A100) == ["occupancy"]
    assert checks(fake("_some_issue_bound_kernel", shared=100_000), A100) == []


def test_trip_table_must_give_one_count_per_loop():
    """`_fuse_forward_kernel`'s table entry has no loop (workload.KERNELS): a binary with one is unpriceable."""
    assert checks(fake(sass=LOOP_SPILL_SASS)) == ["trips"]
    assert checks(fake(sass=STRAIGHT_SASS)) == []
    assert checks(fake("_some_kernel_without_an_entry", sass=LOOP_SPILL_SASS)) == []
    assert checks(fake(sass=LOOP_SPILL_SASS), performance=False) == []


def test_register_limit_per_block_fails_as_launch():
    assert checks(fake(registers=255, num_warps=16), H100, performance=False) == ["launch"]


def test_report_fails_only_on_findings_not_excepted():
    finding = dict(check="spills", kernel="_head_forward_kernel", sm=90, key="K", detail="d", recorded_in="c")
    ok = [{"sm": 90, "variants": 3, "code_paths": 1, "findings": [dict(finding, excepted="why")]}]
    text, status = L.report(ok, 1.0)
    assert status == 0
    for line in ("excepted: sm_90 _head_forward_kernel [K] (c): spills: d", "exception (_head_forward_kernel, "
                 "spills): why", "3 configuration variants and 1 further code paths for sm_90: 0 failing, 1 excepted"):
        assert line in text
    failing = dict(finding, excepted=None, check="shared", sm=80)
    bad = [{"sm": 80, "variants": 3, "code_paths": 1, "findings": [failing]}]
    text, status = L.report(bad, 1.0)
    assert status == 1 and "FAILS: sm_80 _head_forward_kernel [K] (c): shared: d" in text and "1 failing" in text
