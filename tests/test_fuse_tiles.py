"""The fusion kernels' tiling (issue 18): 3-D [channels x rows x columns] tiles with clamped tails, channel
blocks fitted to HRNet's channel counts, the adjoint's tiles, and the masked gradient g returned as the
gradient of an unscaled output-size term. Values against the float64 reference through `check_fuse`
(tests/test_fuse_op.py's harness), on shapes that span several tiles on every axis with ragged tails."""
import pytest
import torch

from hrfast.kernels.resample import cdiv, channel_block

from conftest import TRITON_DEVICE
from test_fuse_op import BF16, CL, F16, F32, F64, Case, _build, _kernel_args, bil, check_fuse, near

HRNET_CHANNELS = (18, 30, 32, 36, 40, 44, 48, 60, 64, 72, 96, 128, 144, 192, 256, 384)


@pytest.mark.parametrize("C", HRNET_CHANNELS)
def test_channel_block_keeps_lanes_busy(C):
    """>= 90% of a channel block's lanes hold real channels, and the block is as wide as that allows."""
    for cap in (4, 16, 64):
        b = channel_block(C, cap)
        assert b & (b - 1) == 0 and 1 <= b <= cap
        assert C / (cdiv(C, b) * b) >= 0.9
        wider = [2 ** i for i in range(b.bit_length(), cap.bit_length())]
        assert all(C / (cdiv(C, w) * w) < 0.9 for w in wider), (C, cap, b)


# several column tiles (forward rows are 64 wide in NCHW, 16 in channels_last; adjoint rows 16 wide), row
# tiles, channel blocks with a tail (C = 18: blocks of 4), odd sizes, and an unscaled output-size term next to
# upsampled ones (its gradient is g itself)
TILED = Case((13, 70), [((13, 70), None), ((13, 70), None), ((7, 35), bil()), ((4, 18), bil()),
                        ((3, 9), near())], N=1, C=18, affine="mixed")


@pytest.mark.parametrize("dtype, layout", [(F64, "nchw"), (F32, "channels_last"), (BF16, "nchw")],
                         ids=["fp64_nchw", "fp32_cl", "bf16_nchw"])
def test_fuse_spanning_tiles(dtype, layout):
    check_fuse(TILED, dtype, layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_unscaled_term_gradient_is_g(layout):
    """With ReLU and upsampled terms the launcher writes g = relu'(y) * grad_y once; the first unscaled
    output-size term gets it as its gradient, in its own layout, and no two gradients share memory."""
    from hrfast.kernels.fuse import fuse_backward, fuse_forward

    case = Case((6, 5), [((6, 5), None), ((6, 5), None), ((3, 3), bil()), ((6, 5), None)], N=2, C=3,
                affine="mixed")  # "mixed": term 1 has no scale
    xs, scales, shifts, resamples, _ = _build(case, F64, layout)
    plan, kxs, kscales, kshifts = _kernel_args(xs, scales, shifts, resamples, case.size, True, layout != "nchw")
    y = fuse_forward(plan, kxs, kscales, kshifts)
    grad_y = torch.randn_like(y)
    grads = fuse_backward(plan, grad_y, y, kxs, kscales, kshifts, [(True, True, True)] * len(kxs))
    g = torch.where(y <= 0, torch.zeros_like(grad_y), grad_y)
    dx1 = grads[1][0]
    assert torch.equal(dx1, g)
    assert dx1.stride() == kxs[1].stride()
    pointers = [t[0].data_ptr() for t in grads if t[0] is not None]
    assert len(pointers) == len(set(pointers))
    fmt = CL if layout != "nchw" else torch.contiguous_format
    assert all(t[0].is_contiguous(memory_format=fmt) for t in grads if t[0] is not None)


# the phase form of the forward (`_fuse_forward_phases`: 2-byte floats, power-of-2 factors, a x4 or x8 term):
# several row groups and column tiles, channel blocks, bilinear x2 / x4 / x8 and nearest terms beside an
# output-size one, NCHW and channels_last
PHASED = Case((24, 80), [((24, 80), None), ((12, 40), bil()), ((6, 20), bil()), ((3, 10), near())], N=2, C=32,
              affine="mixed")
PHASED_X8 = Case((16, 48), [((16, 48), None), ((8, 24), bil()), ((4, 12), bil()), ((2, 6), bil())], N=1, C=16,
                 affine="mixed")


def _phase_form(case: Case, dtype, layout):
    """The phase form's constexprs for `case` (None where the general tile form runs)."""
    from hrfast.kernels import fuse as K

    xs, scales, shifts, resamples, _ = _build(case, dtype, layout)
    plan, *_ = _kernel_args(xs, scales, shifts, resamples, case.size, case.relu, layout != "nchw")
    return K._phase_launch(plan, case.C, dtype)


@pytest.mark.parametrize("case", [PHASED, PHASED_X8], ids=["x2_x4_nearest_x8", "x2_x4_x8"])
@pytest.mark.parametrize("dtype, layout", [(BF16, "nchw"), (BF16, "channels_last"), (F16, "nchw"), (F32, "nchw"),
                                           (F32, "channels_last")],
                         ids=["bf16_nchw", "bf16_cl", "fp16_nchw", "fp32_nchw", "fp32_cl"])
def test_fuse_phase_form(case, dtype, layout):
    assert _phase_form(case, dtype, layout) is not None
    check_fuse(case, dtype, layout)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 * inf
@pytest.mark.parametrize("dtype, bits", [(BF16, torch.int16), (F32, torch.int32)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fuse_phase_form_matches_tiles_bitwise(layout, dtype, bits, monkeypatch):
    """The phase form computes the tile form's arithmetic in its order: the same bits, NaN and inf included,
    with non-finite values at the image's first and last rows / columns (where ATen's source index clamps
    and reads a tap of weight 0)."""
    from hrfast.kernels import fuse as K

    case = PHASED_X8
    xs, scales, shifts, resamples, _ = _build(case, dtype, layout)
    with torch.no_grad():
        xs[1][0, 1, 0, 1] = float("inf")  # row 0, column 1: read with weight 0 by output (0, 0)
        xs[1][0, 2, 7, 23] = float("nan")  # last row and column
        xs[2][0, 3, 1, 0] = float("-inf")
        xs[3][0, 4, 1, 1] = float("inf")
        xs[0][0, 5, 15, 47] = float("nan")
    plan, kxs, kscales, kshifts = _kernel_args(xs, scales, shifts, resamples, case.size, case.relu,
                                               layout != "nchw")
    assert K._phase_launch(plan, case.C, dtype) is not None
    phased = K.fuse_forward(plan, kxs, kscales, kshifts)
    monkeypatch.setattr(K, "_phase_launch", lambda *args: None)
    tiled = K.fuse_forward(plan, kxs, kscales, kshifts)
    assert phased.stride() == tiled.stride()
    assert torch.equal(phased.view(bits), tiled.view(bits))
    assert torch.isnan(tiled).any() and torch.isinf(tiled).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 * inf
def test_adjoint_gather_layouts_bitwise(monkeypatch):
    """The gather form holds a channels_last tile as [channels, columns, rows] (its channels wrapped, not
    clamped, past C): per source pixel the same products and sums in the same order as the NCHW form, so dz
    is bitwise equal across layouts, NaN and inf included (g non-finite at the edges and inside), for a x2
    bilinear, an align_corners bilinear and a 13 / 5 nearest term, C = 20 (a channel block past C). The
    per-channel sums (tiles of other shapes) to summation order."""
    from hrfast.kernels import fuse as K
    from hrfast.plan import BILINEAR, NEAREST, TermPlan

    monkeypatch.setattr(K, "_adjoint_phase_factors", lambda *a: None)
    N, C, dtype = 2, 20, F32
    for term, (h, w), (H, W) in [(TermPlan(BILINEAR, False, (1, 2), (1, 2), True, True), (5, 9), (10, 18)),
                                 (TermPlan(BILINEAR, True, (4, 9), (6, 16), True, True), (5, 7), (10, 17)),
                                 (TermPlan(NEAREST, False, (5, 13), (1, 3), True, True), (5, 4), (13, 12))]:
        z = (1.0 + torch.randn(N, C, h, w)).to(dtype)
        g = _grad_with_nonfinite((N, C), (H, W), dtype, "nchw", inner=(H // 2, W // 2))
        scale = torch.rand(C).add(0.5).to(dtype)
        out = {}
        for layout in ("nchw", "channels_last"):
            fmt = CL if layout == "channels_last" else torch.contiguous_format
            args = [t.contiguous(memory_format=fmt).to(TRITON_DEVICE) for t in (g, z)]
            out[layout] = K.upsample_term_backward(term, *args, scale.to(TRITON_DEVICE), scale.to(TRITON_DEVICE),
                                                   (True, True, True))
        (dz, dscale, dshift), (dz_cl, dscale_cl, dshift_cl) = out["nchw"], out["channels_last"]
        assert dz_cl.is_contiguous(memory_format=CL)
        assert torch.equal(dz.contiguous().view(torch.int32), dz_cl.contiguous().view(torch.int32))
        assert torch.isnan(dz).any() and torch.isinf(dz).any()
        for a, e in ((dscale_cl, dscale), (dshift_cl, dshift)):
            assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf())
            finite = torch.isfinite(e)
            assert torch.allclose(a[finite], e[finite], rtol=1e-5, atol=1e-5 * e[finite].abs().max())


# the adjoint's phase form (`_adjoint_phases`: 2-byte floats, bilinear without align_corners by exactly 2, 4 or 8
# per axis): x2 / x4 / x8 terms, unequal factors (x4 rows, x8 columns), one-pixel-high / -wide sources (the
# first and last edge at once); with ADJOINT_PHASE_MAX_Q = 2 several threads and programs along a row
ADJOINT_PHASED = Case((8, 32), [((8, 32), None), ((4, 16), bil()), ((2, 8), bil()), ((1, 4), bil()),
                                ((2, 4), bil())], N=2, C=8, affine="mixed")


def _adjoint_phase_terms(case: Case, dtype, layout):
    from hrfast.kernels import fuse as K

    xs, scales, shifts, resamples, _ = _build(case, dtype, layout)
    plan, kxs, kscales, kshifts = _kernel_args(xs, scales, shifts, resamples, case.size, case.relu, layout != "nchw")
    terms = [k for k, t in enumerate(plan.terms) if t.mode != 0]
    return plan, kxs, kscales, kshifts, terms, K


@pytest.mark.parametrize("max_q", [32, 2])
@pytest.mark.parametrize("dtype, layout", [(BF16, "nchw"), (BF16, "channels_last"), (F16, "nchw"), (F32, "nchw"),
                                           (F32, "channels_last")],
                         ids=["bf16_nchw", "bf16_cl", "fp16_nchw", "fp32_nchw", "fp32_cl"])
def test_adjoint_phase_form(dtype, layout, max_q, monkeypatch):
    from hrfast.kernels import fuse as K

    monkeypatch.setattr(K, "ADJOINT_PHASE_MAX_Q", max_q)
    plan, kxs, _, _, terms, _ = _adjoint_phase_terms(ADJOINT_PHASED, dtype, layout)
    assert all(K._adjoint_phase_factors(plan.terms[k], kxs[k], *ADJOINT_PHASED.size) for k in terms)
    if layout == "channels_last":  # x2, x4 and x8 in the phase form (fp32: one row launch)
        forms = [K._adjoint_config(kxs[k], plan.terms[k], *ADJOINT_PHASED.size, True)[5] is not None for k in terms]
        assert forms == [True, True, True, True]
    check_fuse(ADJOINT_PHASED, dtype, layout)


def _grad_with_nonfinite(nc, size, dtype, layout, inner):
    """A random output gradient [N, C, H, W] with inf / -inf / NaN at the image's corners and edges (outputs that
    read a source with weight 1 or not at all) and at `inner` (y, x), channels 1-5."""
    (N, C), (H, W) = nc, size
    g = torch.randn(N, C, H, W, dtype=dtype)
    if layout != "nchw":
        g = g.contiguous(memory_format=CL)
    g[0, 1, 0, 0] = float("inf")
    g[0, 2, H - 1, W - 1] = float("-inf")
    g[1, 3, 0, W - 1] = float("nan")
    g[1, 4, inner[0], inner[1]] = float("inf")
    g[1, 5, H - 1, 1] = float("nan")
    return g


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 * inf
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_adjoint_phase_form_matches_gather(layout, monkeypatch):
    """Against the general gather kernel on the same g: dz, d(scale) and d(shift) agree to float32 summation
    order (dz to a bf16 rounding), and NaN / inf reach the same elements: g non-finite at the image's first and
    last rows and columns (outputs that read a source with weight 1 or not at all) and inside."""
    plan, kxs, kscales, kshifts, terms, K = _adjoint_phase_terms(ADJOINT_PHASED, BF16, layout)
    monkeypatch.setattr(K, "ADJOINT_PHASE_MAX_Q", 2)
    H, W = ADJOINT_PHASED.size
    g = _grad_with_nonfinite(kxs[0].shape[:2], (H, W), BF16, layout, inner=(3, 13)).to(TRITON_DEVICE)
    for k in terms:
        term, z = plan.terms[k], kxs[k]
        assert K._adjoint_phase_factors(term, z, H, W) is not None
        args = (term, g, z, kscales[k], kshifts[k], (True, True, True))
        phased = K.upsample_term_backward(*args)
        with monkeypatch.context() as m:
            m.setattr(K, "_adjoint_phase_factors", lambda *a: None)
            gathered = K.upsample_term_backward(*args)
        for name, a, e in zip(("dz", "dscale", "dshift"), phased, gathered):
            assert (a is None) == (e is None) and (name != "dz" or a is not None)
            if a is None:
                continue
            a, e = a.double().cpu(), e.double().cpu()
            for test in (torch.isnan, lambda t: t == float("inf"), lambda t: t == float("-inf")):
                assert torch.equal(test(a), test(e)), (k, name)
            finite = torch.isfinite(e)
            assert torch.allclose(a[finite], e[finite], rtol=2 ** -7, atol=1e-5 * e[finite].abs().max()), (k, name)
        assert torch.isnan(phased[0]).any() and torch.isinf(phased[0]).any()


# one `_adjoint_row_kernel` launch for the phase-form terms of a row (issue 18): it reads g once for all of
# them. Three coarse rows (first, middle, last), two images, two column tiles and channel blocks (narrow
# tiles), a x2 term, one by 4 rows x 8 columns and a x8 one, term 1 without scale ("mixed").
# Against the float64 reference: test_adjoint_phase_form (its x2 / x4 / x8 terms take the row launch).
ADJOINT_ROW = Case((24, 32), [((24, 32), None), ((12, 16), bil()), ((6, 4), bil()), ((3, 4), bil())], N=2, C=8,
                   affine="mixed")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 * inf
@pytest.mark.parametrize("dtype, layout, which", [(BF16, "nchw", "all"), (BF16, "channels_last", "all"),
                                                  (F32, "nchw", "some"), (F32, "channels_last", "all")],
                         ids=["bf16_nchw", "bf16_cl", "fp32_nchw", "fp32_cl"])
def test_adjoint_row_matches_per_term_launches_bitwise(dtype, layout, which, monkeypatch):
    """The row launch computes each term's `_upsample_adjoint_kernel` phase-form arithmetic in its order: the
    same dz and the same partial sums (so the same d(scale), d(shift)) as one launch per term, bit for bit, NaN
    and inf included (g non-finite at the image's first and last rows and columns and inside). "some": a term
    without dz, one without d(scale) (z not read). bf16 NCHW also with g read column by column and with 64-bit
    offsets. (A step's rows sharing the launch: test_backward_rows_match_per_row_calls_bitwise.)"""
    plan, kxs, kscales, kshifts, terms, K = _adjoint_phase_terms(ADJOINT_ROW, dtype, layout)
    max_q = 1 if layout == "nchw" else 2  # two column tiles (16 / 8 output columns per thread)
    # fp32 channels_last: [4 x 2] programs of one element per thread (ADJOINT_PHASE_THREADS, its row launch's cells)
    threads = 8 if (dtype, layout) == (F32, "channels_last") else 4
    for name, value in (("ADJOINT_PHASE_MAX_Q", max_q), ("ADJOINT_PHASE_THREADS", threads), ("ADJOINT_PHASE_CL_C", 4)):
        monkeypatch.setattr(K, name, value)
    (N, C), (H, W) = kxs[0].shape[:2], ADJOINT_ROW.size
    g = _grad_with_nonfinite((N, C), (H, W), dtype, layout, inner=(11, 13))
    g[0, 6, 8, 16] = float("-inf")  # a coarse row's and a column tile's first pixel
    g = g.to(TRITON_DEVICE)
    needs = {k: (True, plan.terms[k].has_scale, plan.terms[k].has_shift) for k in terms}
    if which == "some":
        needs[1], needs[2] = (False, False, True), (True, False, True)
    cfgs = {k: K._adjoint_config(kxs[k], plan.terms[k], H, W, layout != "nchw") for k in terms}
    assert all(cfgs[k][0] < C and cfgs[k][4][0] > kxs[k].shape[2] for k in terms)  # channel blocks, column tiles
    row = K._adjoint_row_group(terms, cfgs, kxs)
    # x2, 4 x 8 and x8 together in NCHW (fp32 with its half-width rows) and fp32 channels_last (a channel per
    # thread); bf16 channels_last takes two (ADJOINT_ROW_MAX_TERMS_WIDE)
    assert row == (terms if layout == "nchw" or dtype == F32 else terms[:2])
    assert len({cfgs[k][5][:2] for k in row}) == len(row)
    bits = torch.int16 if dtype == BF16 else torch.int32

    def parts():
        return {k: torch.full((2, cfgs[k][3], C), float("nan"), dtype=torch.float32, device=g.device) for k in row}

    row_parts, term_parts = parts(), parts()
    row_dz = _adjoint_row_launch(K, plan, row, g, kxs, kscales, needs, False, cfgs, row_parts)
    for k in row:
        dz = K._adjoint_launch(plan.terms[k], g, kxs[k], kscales[k], needs[k], False, cfgs[k], term_parts[k])
        assert (dz is None) == (row_dz[k] is None) == (not needs[k][0])
        if dz is not None:
            assert row_dz[k].stride() == dz.stride()
            assert torch.equal(row_dz[k].view(bits), dz.view(bits)), k
        for slot, need in enumerate(needs[k][1:]):
            if need:  # the rows a launch writes (the others stay NaN in both)
                assert torch.equal(row_parts[k][slot].view(torch.int32), term_parts[k][slot].view(torch.int32)), k
    assert any(torch.isnan(row_dz[k]).any() and torch.isinf(row_dz[k]).any() for k in row if needs[k][0])
    if dtype != BF16 or layout != "nchw":
        return

    # bf16 NCHW reads g as words of two columns (PAIRS); a g 2 bytes off a word reads the columns one by one,
    # and 64-bit offsets read the words too: the same bits
    g_odd = torch.empty(g.numel() + 1, dtype=g.dtype, device=g.device)[1:].view(g.shape).copy_(g)
    assert K._reads_pairs(g, False) and not K._reads_pairs(g_odd, False) and not K._reads_pairs(g, True)
    for g_other, int64 in ((g_odd, False), (g, True)):
        other_dz = _adjoint_row_launch(K, plan, row, g_other, kxs, kscales, needs, int64, cfgs, parts())
        for k in row:
            assert torch.equal(other_dz[k].view(bits), row_dz[k].view(bits)), (k, int64)


def _adjoint_row_launch(K, *args):
    """The terms of `K._adjoint_row_entry(*args)` through their one `_adjoint_row_kernel` launch: dz by term."""
    dzs, entry = K._adjoint_row_entry(*args)
    K._adjoint_launch_rows([entry])
    return dzs


class _Spy:
    """A Triton kernel whose `[grid]` launches are counted into `launched`."""

    def __init__(self, kernel, launched):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        self.launched.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype, layout", [(BF16, "nchw"), (F32, "channels_last")], ids=["bf16_nchw", "fp32_cl"])
def test_backward_rows_match_per_row_calls_bitwise(dtype, layout, monkeypatch):
    """`fuse_backward_rows` (a step's rows: one output-size launch, one adjoint-row launch, one reduction launch
    for all) gives each row's gradients bitwise as its own `fuse_backward` call, for rows of different channels,
    sizes, term mixes and accumulation dtypes; a `scaled_by_caller` term gets g itself (no dx written) and the
    rest is unchanged. Row 0's x2 and x4 terms and row 1's single x2 term share the adjoint-row launch (alone,
    row 1's takes `_upsample_adjoint_kernel`); row 0's 3 -> 8 term and row 1's nearest one keep their own
    launches."""
    from hrfast.kernels import fuse as K

    cases = [Case((8, 12), [((8, 12), None), ((4, 6), bil()), ((2, 3), bil()), ((3, 5), bil())], N=2, C=3),
             Case((4, 6), [((4, 6), None), ((4, 6), None), ((2, 3), near()), ((2, 3), bil())], N=2, C=5,
                  affine="mixed"),
             Case((2, 3), [((2, 3), None)] * 4, N=2, C=9, affine="mixed")]  # "mixed": term 1 unscaled
    calls, alone = [], []
    row_dtypes = [dtype, dtype, F64]  # an fp64 row: its sums in a launch of their own (one per accumulation dtype)
    for case, row_dtype in zip(cases, row_dtypes):
        xs, scales, shifts, resamples, _ = _build(case, row_dtype, layout)
        plan, kxs, kscales, kshifts = _kernel_args(xs, scales, shifts, resamples, case.size, True, layout != "nchw")
        y = K.fuse_forward(plan, kxs, kscales, kshifts)
        grad_y = torch.randn_like(y)
        needs = [(True, s is not None, b is not None) for s, b in zip(kscales, kshifts)]
        alone.append(K.fuse_backward(plan, grad_y, y, kxs, kscales, kshifts, needs))
        scaled = [k for k, t in enumerate(plan.terms) if t.mode == 0 and t.has_scale]
        calls.append(K.BackwardCall(plan, grad_y, y, kxs, kscales, kshifts, needs, scaled))
    assert [len(c.scaled_by_caller) for c in calls] == [1, 1, 3]
    monkeypatch.setattr(K, "ADJOINT_ROWS_MIN_CELLS", 1)  # these rows' programs hold a few cells (C = 3, 5)
    launched = {name: [] for name in ("_adjoint_rows_kernel", "_adjoint_row_kernel", "_upsample_adjoint_kernel")}
    for name, grids in launched.items():
        monkeypatch.setattr(K, name, _Spy(getattr(K, name), grids))
    rows = K.fuse_backward_rows(calls)
    assert {name: len(grids) for name, grids in launched.items()} == {
        "_adjoint_rows_kernel": 1, "_adjoint_row_kernel": 0, "_upsample_adjoint_kernel": 2}
    for call, together, own, row_dtype in zip(calls, rows, alone, row_dtypes):
        g = torch.where(call.y <= 0, torch.zeros_like(call.grad_y), call.grad_y)
        acc = torch.float64 if row_dtype == F64 else torch.float32
        for k, (grads, expected) in enumerate(zip(together, own)):
            if k in call.scaled_by_caller:
                assert torch.equal(grads[0], g)
                assert torch.equal(own[k][0], (g.to(acc) * call.scales[k].to(acc)[:, None, None]).to(row_dtype))
                grads, expected = grads[1:], expected[1:]
            for a, e in zip(grads, expected):
                assert (a is None) == (e is None) and (a is None or torch.equal(a, e))


# a training step's rows with ReLU bits (`fuse_forward_rows_with_bits`): a x2 / x8 row (phase form at G = 8
# anyway), a x2-only row and an output-size-only row (the general tile without bits: the phase form at G = 8
# with them), and a row of 6 rows (not a multiple of 8: no bits, its backward reads y)
BITS_ROWS = [Case((16, 16), [((16, 16), None), ((8, 8), bil()), ((2, 2), bil())], N=2, C=4),
             Case((8, 24), [((8, 24), None), ((4, 12), bil())], N=1, C=4),
             Case((8, 16), [((8, 16), None)] * 3, N=2, C=4, affine="mixed"),
             Case((6, 8), [((6, 8), None), ((3, 4), bil())], N=2, C=4)]


@pytest.mark.parametrize("dtype, layout", [(BF16, "channels_last"), (F16, "nchw"), (F32, "nchw")],
                         ids=["bf16_cl", "fp16_nchw", "fp32_nchw"])
def test_relu_bits_match_y_bitwise(dtype, layout):
    """The forward's ReLU bits (bit h % 8 of byte [n, c, h // 8, w]) are `relu_backward`'s mask of y as stored:
    0 where y <= 0, 1 elsewhere, NaN included, and (fp16) 0 where a positive sum rounds to 0; y keeps the
    bits `fuse_forward_rows` gives; the backward reading the bits gives the gradients of the one reading y, bit
    for bit. The 6-row row gets no bits."""
    from hrfast.kernels import fuse as K

    calls, grads_y = [], []
    for i, case in enumerate(BITS_ROWS):
        xs, scales, shifts, resamples, _ = _build(case, dtype, layout)
        plan, kxs, kscales, kshifts = _kernel_args(xs, scales, shifts, resamples, case.size, True, layout != "nchw")
        kxs[0][0, 1, 1, 2] = float("nan")
        if i == 1:  # channel 0: x0 * 1 + (2^-25 - 2^-10) + Up(x1) * 0 = 2^-25 at x0 = 2^-10, 0 in fp16
            kxs[0][0, 0, 3, 5] = 2.0 ** -10
            kscales = [s.float() for s in kscales]
            kshifts = [b.float() for b in kshifts]
            kscales[0][0], kshifts[0][0], kscales[1][0], kshifts[1][0] = 1.0, 2.0 ** -25 - 2.0 ** -10, 0.0, 0.0
        calls.append((plan, kxs, kscales, kshifts))
    assert [K._phase_launch(c[0], 4, dtype, True) is not None for c in calls] == [True, True, True, False]
    assert [K._phase_launch(c[0], 4, dtype) is not None for c in calls] == [True, False, False, False]
    outs = K.fuse_forward_rows_with_bits(calls)
    backward = []
    for (y, bits), y_rows, (plan, kxs, kscales, kshifts) in zip(outs, K.fuse_forward_rows(calls), calls):
        assert y.stride() == y_rows.stride() and _same_bits(y, y_rows)
        grad_y = torch.randn(y.shape, dtype=torch.float64).to(y)
        needs = [(True, s is not None, b is not None) for s, b in zip(kscales, kshifts)]
        backward.append((K.BackwardCall(plan, grad_y, y, kxs, kscales, kshifts, needs),
                         K.BackwardCall(plan, grad_y, y if bits is None else None, kxs, kscales, kshifts, needs,
                                        relu_bits=bits)))
        if y.shape[2] % 8:
            assert bits is None
            continue
        N, C, H, W = y.shape
        passes = ~(y <= 0)
        expected = (passes.view(N, C, H // 8, 8, W).to(torch.int32)
                    << torch.arange(8).view(1, 1, 1, 8, 1)).sum(3).to(torch.uint8)
        assert bits.shape == (N, C, H // 8, W)
        assert bits.is_contiguous(memory_format=CL if layout != "nchw" else torch.contiguous_format)
        assert torch.equal(bits, expected)
    assert torch.isnan(outs[0][0][0, 1, 1, 2])
    if dtype == F16:
        assert outs[1][0][0, 0, 3, 5].item() == 0.0 and not outs[1][1][0, 0, 0, 5] & 8
    for with_y, with_bits in zip(K.fuse_backward_rows([b[0] for b in backward]),
                                 K.fuse_backward_rows([b[1] for b in backward])):
        for a, e in zip((t for grads in with_bits for t in grads), (t for grads in with_y for t in grads)):
            assert (a is None) == (e is None) and (a is None or _same_bits(a, e))


def _same_bits(a, b):
    """Equal bit for bit (NaN payloads and signed zeros included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def test_relu_bits_are_checked():
    """Bits of another shape or dtype, or bits without ReLU, and a ReLU row with neither y nor bits are refused
    by name."""
    from hrfast.kernels import fuse as K

    case = BITS_ROWS[1]
    xs, scales, shifts, resamples, _ = _build(case, F32, "nchw")
    plan, kxs, kscales, kshifts = _kernel_args(xs, scales, shifts, resamples, case.size, True, False)
    grad_y = torch.randn(1, 4, 8, 24)
    needs = [(True, True, True)] * 2
    for bits in (torch.zeros(1, 4, 1, 24, dtype=torch.int32), torch.zeros(1, 4, 8, 24, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="relu_bits"):
            K.fuse_backward_rows([K.BackwardCall(plan, grad_y, None, kxs, kscales, kshifts, needs, relu_bits=bits)])
    with pytest.raises(ValueError, match="y: a plan with ReLU"):
        K.fuse_backward_rows([K.BackwardCall(plan, grad_y, None, kxs, kscales, kshifts, needs)])
    plan_no_relu, *_ = _kernel_args(xs, scales, shifts, resamples, case.size, False, False)
    with pytest.raises(ValueError, match="relu_bits"):
        K.fuse_backward_rows([K.BackwardCall(plan_no_relu, grad_y, None, kxs, kscales, kshifts, needs,
                                             relu_bits=torch.zeros(1, 4, 1, 24, dtype=torch.uint8))])


@pytest.mark.parametrize("dtype, layout", [(BF16, "nchw"), (F32, "channels_last")], ids=["bf16_nchw", "fp32_cl"])
def test_forward_rows_match_per_row_calls_bitwise(dtype, layout):
    """`fuse_forward_rows` (a step's rows in one `_fuse_forward_rows_kernel` launch) writes each row's output
    bitwise as its own `fuse_forward` call: a phase-form row, tile rows and a row of more than MAX_TERMS terms
    (its chained launches first, its last one in the group)."""
    from hrfast.kernels import fuse as K

    cases = [PHASED_X8, Case((6, 10), [((6, 10), None), ((3, 5), bil()), ((2, 3), near())], N=2, C=3),
             Case((5, 3), [((5, 3), None)] * 5 + [((2, 2), bil())], N=2, C=5, affine="mixed")]
    assert _phase_form(cases[0], dtype, layout) is not None and len(cases[2].terms) > K.MAX_TERMS
    calls = []
    for case in cases:
        xs, scales, shifts, resamples, _ = _build(case, dtype, layout)
        plan, kxs, kscales, kshifts = _kernel_args(xs, scales, shifts, resamples, case.size, True, layout != "nchw")
        calls.append((plan, kxs, kscales, kshifts))
    for together, call in zip(K.fuse_forward_rows(calls), calls):
        alone = K.fuse_forward(*call)
        assert together.stride() == alone.stride() and torch.equal(together, alone)
