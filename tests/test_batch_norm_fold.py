"""The batch-statistics fold of batch norm (`hrfast.batchnorm.fold_batch_norm` in training, `_BatchStatsFold`) on
both implementations, the Triton kernels (`hrfast.kernels.batch_norm`, through the interpreter without a GPU) and
plain PyTorch, against nn.BatchNorm2d: the output term * scale + shift, the gradients of z, weight and bias, the
running statistics and num_batches_tracked, in float64 on z = 3 + randn (a mean that hides cancellation bugs of a
naive sum of squares), odd sizes, N=1, C=1, H=W=1, channels_last, affine=False, momentum=None; a large mean over a
small spread (|mean| / std 1e4 in fp32, 1e9 in fp64) against the exact statistics; bf16 within twice PyTorch's own
error; gradcheck; bitwise determinism of the kernels (the merged finalize and the finalize launch alike); several
folds at once (`fold_batch_norms`, a fusion row's: one statistics launch and one backward launch) bitwise equal to
the folds one by one."""
import copy

import pytest
import torch
import torch.nn as nn

from hrfast.batchnorm import FoldSpec, _BatchStatsFold, fold_batch_norm, fold_batch_norms
from hrfast.testing import assert_low_precision_close, assert_rel_close, tolerance

IMPLS = ("kernels", "reference")


@pytest.fixture
def kernels_module():
    from hrfast.kernels import batch_norm
    return batch_norm


@pytest.fixture
def small_tiles(kernels_module, monkeypatch):
    """Tiles of 16 elements, 2 partials per finalize step: every loop of the kernels runs several times on the
    tiny test shapes (chunks of several tiles, a partial tail tile, more partials than one finalize step)."""
    monkeypatch.setattr(kernels_module, "TILE", 16)
    monkeypatch.setattr(kernels_module, "STATS_PROGRAMS", 32)
    monkeypatch.setattr(kernels_module, "PROGRAM_TILES", 2)
    monkeypatch.setattr(kernels_module, "MAX_CHANNELS_LAST_BLOCK", 4)
    monkeypatch.setattr(kernels_module, "FINALIZE_BLOCK_C", 2)
    monkeypatch.setattr(kernels_module, "FINALIZE_BLOCK_S", 2)


def _bn(C, dtype=torch.float64, **kwargs):
    """A random BN module in training mode (random affine parameters and running statistics), and its copy."""
    bn = nn.BatchNorm2d(C, **kwargs).to(dtype).train()
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        if bn.running_mean is not None:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return bn, copy.deepcopy(bn)


def _fold(bn, z, impl, kernels_module=None, term_dtype=None):
    """term * scale + shift through fold_batch_norm; with impl="kernels" asserts the kernels ran."""
    calls = []
    if impl == "kernels":
        launch = kernels_module.batch_stats

        def counted(*args, **kwargs):
            calls.append(1)
            return launch(*args, **kwargs)

        kernels_module.batch_stats = counted
    try:
        term, scale, shift = fold_batch_norm(bn, z, term_dtype, use_kernels=impl == "kernels")
    finally:
        if impl == "kernels":
            kernels_module.batch_stats = launch
    assert len(calls) == (1 if impl == "kernels" else 0)
    return term, term * scale[:, None, None] + shift[:, None, None]


def _z(shape, dtype=torch.float64, channels_last=False):
    z = 3.0 + torch.randn(shape, dtype=torch.float64)
    z = z.to(dtype)
    return z.contiguous(memory_format=torch.channels_last) if channels_last else z


def _compare(bn, ref, impl, kernels_module, z, steps=1):
    for _ in range(steps):  # more than one step: the running averages (momentum None: cumulative) compound
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        _, y = _fold(bn, z1, impl, kernels_module)
        y_ref = ref(z2)
        g = torch.randn_like(y_ref)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        tol = tolerance(torch.float64)
        assert_rel_close(y, y_ref, tol, "output")
        assert_rel_close(z1.grad, z2.grad, tol, "grad z")
        assert z1.grad.stride() == z1.stride()
        for name in ("weight", "bias"):
            if getattr(ref, name) is not None:
                assert_rel_close(getattr(bn, name).grad, getattr(ref, name).grad, tol, f"grad {name}")
        for name in ("running_mean", "running_var"):
            if getattr(ref, name) is not None:
                assert_rel_close(getattr(bn, name), getattr(ref, name), tol, name)
            else:
                assert getattr(bn, name) is None
        if ref.num_batches_tracked is not None:
            assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item()


# c48: channels_last statistics in lane-fitted channel blocks (16 of 48, `stats_config`)
SHAPES = {"odd": (2, 3, 5, 7), "n1": (1, 4, 3, 5), "c1": (3, 1, 4, 5), "hw1": (5, 3, 1, 1), "h1": (2, 3, 1, 9),
          "c48": (2, 48, 3, 5)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_matches_batchnorm2d(impl, shape, channels_last, kernels_module):
    bn, ref = _bn(shape[1])
    _compare(bn, ref, impl, kernels_module, _z(shape, channels_last=channels_last))


@pytest.mark.parametrize("int64, merged, images", [(False, True, False), (True, True, False), (False, False, False),
                                                   (False, True, True), (True, False, True)],
                         ids=["int32", "int64", "two_launches", "images", "images_int64_two_launches"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_kernel_loops(channels_last, int64, merged, images, kernels_module, small_tiles, monkeypatch):
    """Several tiles per chunk, several chunks per image, several finalize steps (small_tiles), or (images)
    programs over several whole images of several tiles each; also with the 64-bit offsets tensors past 2**31
    elements take, and with the finalize as a launch of its own. A partial last tile in every case (slots with
    one value less). The merged finalize leaves every ticket at 0 for the next launch."""
    if int64:
        monkeypatch.setattr(kernels_module, "_int64", lambda *tensors: True)
    monkeypatch.setattr(kernels_module, "MERGED_FINALIZE", merged)
    if images:
        monkeypatch.setattr(kernels_module, "PROGRAM_TILES", 8)
    shape = (6, 5, 3, 5) if images else (3, 5, 6, 7)
    C, P = shape[1], shape[2] * shape[3]
    s_c = 1 if channels_last else P
    block_c, block_p, splits, chunk, imgs = kernels_module.stats_config(shape[0], C, P, s_c)
    assert P % block_p and chunk > block_p
    if images:
        assert splits == 1 and 1 < imgs < shape[0]
    else:
        assert imgs == 1 and splits > 1 and shape[0] * splits > 2
    bn, ref = _bn(C)
    _compare(bn, ref, "kernels", kernels_module, _z(shape, channels_last=channels_last))
    assert all(int(t.abs().sum()) == 0 for t in kernels_module._TICKETS.values())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kwargs", [{"affine": False}, {"momentum": None}, {"track_running_stats": False}],
                         ids=["no_affine", "cumulative", "untracked"])
def test_module_options(impl, kwargs, kernels_module):
    bn, ref = _bn(3, **kwargs)
    _compare(bn, ref, impl, kernels_module, _z((2, 3, 3, 5)), steps=2)


def test_non_contiguous_strides(kernels_module):
    """A layout whose H and W do not collapse (a slice along W) is read through a contiguous copy."""
    base = _z((2, 3, 4, 9)).requires_grad_()
    base_ref = base.detach().clone().requires_grad_()
    z, z_ref = base[..., ::2], base_ref[..., ::2]
    assert kernels_module._pixel_strides(z) is None
    bn, ref = _bn(3)
    _, y = _fold(bn, z, "kernels", kernels_module)
    y_ref = ref(z_ref)
    g = torch.randn_like(y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert_rel_close(y, y_ref, tolerance(torch.float64), "output")
    assert_rel_close(base.grad, base_ref.grad, tolerance(torch.float64), "grad z")


@pytest.mark.parametrize("impl", IMPLS)
def test_large_mean_fp32(impl, kernels_module):
    """z = 300 + randn in fp32: statistics as accurate as fp32 allows (a sum of squares would lose the variance)."""
    z = (300.0 + torch.randn(4, 3, 7, 9)).float()
    bn, _ = _bn(3, dtype=torch.float32)
    ref64 = copy.deepcopy(bn).double()
    _, scale, shift = fold_batch_norm(bn, z, use_kernels=impl == "kernels")
    var, mean = torch.var_mean(z.double(), dim=(0, 2, 3), correction=0)
    r = torch.rsqrt(var + bn.eps)
    assert_rel_close(scale, ref64.weight * r, tolerance(torch.float32), "scale")
    assert_rel_close(shift, ref64.bias - mean * ref64.weight * r, tolerance(torch.float32), "shift")


@pytest.mark.parametrize("dtype, mean, std", [(torch.float32, 1e3, 0.1), (torch.float64, 1e6, 1e-3)],
                         ids=["fp32", "fp64"])
@pytest.mark.parametrize("tiles", ["default", "small", "images"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_large_mean_small_variance(dtype, mean, std, tiles, channels_last, kernels_module, request, monkeypatch):
    """The statistics kernel's shifted sums keep the variance of z = mean + std * randn with |mean| / std = 1e4
    (fp32) or 1e9 (fp64), where a sum of squares of uncentred values would lose all of it (its error,
    u * mean^2 / std^2, is 6 in fp32 and 100 in fp64): mean and r = 1 / sqrt(var + eps) within the dtype's
    tolerance of the exact statistics, odd sizes, both layouts, one program per channel block (default tiles),
    several programs of several chunks each (small) and programs over several images (images)."""
    if tiles != "default":
        request.getfixturevalue("small_tiles")
    if tiles == "images":
        monkeypatch.setattr(kernels_module, "PROGRAM_TILES", 8)
    shape = (6, 3, 5, 3) if tiles == "images" else (3, 3, 7, 5)
    z = (mean + std * torch.randn(shape, dtype=torch.float64)).to(dtype)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    eps = 1e-12 if dtype == torch.float64 else 1e-8
    (stats, _, _), = kernels_module.batch_stats([kernels_module.StatsTerm(z, None, None, eps, dtype)])
    # exact reference: shifted by one of its own values (exact in float64: Sterbenz), then centred
    z64 = z.double()
    ref = z64[0, :, 0, 0]
    var, shifted_mean = torch.var_mean(z64 - ref[:, None, None], dim=(0, 2, 3), correction=0)
    assert_rel_close(stats[0].double(), ref + shifted_mean, tolerance(dtype), "mean")
    assert_rel_close(stats[1].double(), torch.rsqrt(var + eps), tolerance(dtype), "r")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels_last, module_dtype", [(False, torch.float32), (True, torch.float32),
                                                         (False, torch.bfloat16)], ids=["nchw", "cl", "bf16_module"])
def test_bf16(impl, channels_last, module_dtype, kernels_module):
    """bf16 z, fp32 or bf16 module: output, every gradient and the running statistics within twice PyTorch's own
    bf16 error (vs float64). A bf16 module gets its bias gradient converted from fp32 g_shift."""
    shape = (2, 4, 5, 7)
    z64 = _z(shape, channels_last=channels_last)
    z = z64.to(torch.bfloat16)
    bn, low = _bn(4, dtype=module_dtype)
    ref = copy.deepcopy(bn).double()
    g = torch.randn(shape, dtype=torch.float64)
    zk, zl, zr = z.clone().requires_grad_(), z.clone().requires_grad_(), z.double().requires_grad_()
    term, y = _fold(bn, zk, impl, kernels_module)
    assert term.dtype == torch.bfloat16 and y.dtype == torch.float32
    y_low, y_ref = low(zl), ref(zr)
    (y * g.float()).sum().backward()
    (y_low * g.to(y_low.dtype)).sum().backward()
    (y_ref * g).sum().backward()
    assert zk.grad.dtype == torch.bfloat16
    assert bn.bias.grad.dtype == bn.weight.grad.dtype == module_dtype
    assert_low_precision_close(y, y_ref, y_low, "output", torch.bfloat16)
    assert_low_precision_close(zk.grad, zr.grad, zl.grad, "grad z")
    for name in ("weight", "bias"):
        assert_low_precision_close(getattr(bn, name).grad, getattr(ref, name).grad, getattr(low, name).grad,
                                   f"grad {name}", torch.bfloat16)
    for name in ("running_mean", "running_var"):
        assert_low_precision_close(getattr(bn, name), getattr(ref, name), getattr(low, name), name,
                                   torch.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_promoted_term(impl, kernels_module):
    """term_dtype fp64 for an fp32 z (terms of mixed dtypes): the term is promoted, z's gradient comes back in
    fp32, computed in fp64 (the module is fp64)."""
    z = _z((2, 3, 4, 5), torch.float32)
    bn, ref = _bn(3)
    zk, zr = z.clone().requires_grad_(), z.double().requires_grad_()
    term, y = _fold(bn, zk, impl, kernels_module, term_dtype=torch.float64)
    assert term.dtype == torch.float64
    y_ref = ref(zr)
    g = torch.randn_like(y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert zk.grad.dtype == torch.float32
    assert_rel_close(y, y_ref, tolerance(torch.float64), "output")
    assert_rel_close(zk.grad, zr.grad.float(), tolerance(torch.float32), "grad z")
    assert_rel_close(bn.weight.grad, ref.weight.grad, tolerance(torch.float64), "grad weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_forward(impl, kernels_module):
    """Training forward without autograd (z does not require grad, no_grad): same output and side effects."""
    z = _z((2, 3, 4, 5))
    bn, ref = _bn(3)
    with torch.no_grad():
        term, y = _fold(bn, z, impl, kernels_module)
        y_ref = ref(z)
    assert not y.requires_grad
    assert_rel_close(y, y_ref, tolerance(torch.float64), "output")
    assert_rel_close(bn.running_var, ref.running_var, tolerance(torch.float64), "running_var")
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_one_value_per_channel(impl):
    bn, _ = _bn(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fold_batch_norm(bn, _z((1, 3, 1, 1)), use_kernels=impl == "kernels")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(impl):
    """A group of two folds (different shapes, one without affine parameters, one channels_last), every input's
    gradient: the grouped backward launch on the kernels."""
    z0 = _z((2, 2, 3, 3)).requires_grad_()
    z1 = _z((3, 2, 2, 1), channels_last=True).requires_grad_()
    w = torch.rand(2, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).requires_grad_()
    spec = FoldSpec(torch.float64, torch.float64, 1e-5, 0.0, impl == "kernels")

    def fold(z0, z1, w, b):
        return _BatchStatsFold.apply((spec, spec), z0, z1, w, None, b, None, *([None] * 6))

    assert torch.autograd.gradcheck(fold, (z0, z1, w, b))


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_raises(impl):
    z = _z((2, 2, 3, 3)).requires_grad_()
    bn, _ = _bn(2)
    term, scale, shift = fold_batch_norm(bn, z, use_kernels=impl == "kernels")
    (gz,) = torch.autograd.grad((term * scale[:, None, None]).square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        gz.sum().backward()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_kernels_deterministic(channels_last, kernels_module, small_tiles, monkeypatch):
    """Two runs give bitwise equal statistics, running statistics and gradients (no atomics, fixed order), and
    so does a third with the finalize as a launch of its own instead of merged into the statistics launch."""
    z = _z((3, 5, 6, 7), torch.float32, channels_last)
    g = torch.randn(z.shape)
    results = []
    for merged in (True, True, False):
        monkeypatch.setattr(kernels_module, "MERGED_FINALIZE", merged)
        torch.manual_seed(0)  # the same module every time
        bn, _ = _bn(5, dtype=torch.float32)
        zi = z.clone().requires_grad_()
        _, y = _fold(bn, zi, "kernels", kernels_module)
        (y * g).sum().backward()
        results.append([y, zi.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------ several folds at once (a fusion row)


class _Counting:
    """A kernel whose launches are counted (kernel[grid](...) as the launchers call it)."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


def _group_case(dtype=torch.float64, module_dtype=torch.float64):
    """Three folds as a fusion row has them (the same C, different sizes; one channels_last) plus variety: no
    affine parameters, not tracked."""
    shapes = [(3, 5, 6, 7), (3, 5, 3, 4), (3, 5, 2, 1)]
    zs = [_z(shapes[0], dtype), _z(shapes[1], dtype, channels_last=True), _z(shapes[2], dtype)]
    torch.manual_seed(1)
    bns = [_bn(5, dtype=module_dtype)[0], _bn(5, dtype=module_dtype, affine=False)[0],
           _bn(5, dtype=module_dtype, track_running_stats=False)[0]]
    return bns, zs


def _run_folds(bns, zs, gs, grouped, use_kernels=True):
    zs = [z.clone().requires_grad_() for z in zs]
    if grouped:
        results = fold_batch_norms(bns, zs, use_kernels=use_kernels)
    else:
        results = [fold_batch_norm(bn, z, use_kernels=use_kernels) for bn, z in zip(bns, zs)]
    ys = [term * scale[:, None, None] + shift[:, None, None] for term, scale, shift in results]
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()
    out = [t for r in results for t in r] + ys + [z.grad for z in zs]
    for bn in bns:
        out += [t for t in (bn.weight.grad if bn.weight is not None else None,
                            bn.bias.grad if bn.bias is not None else None, bn.running_mean, bn.running_var,
                            bn.num_batches_tracked) if t is not None]
    return out


@pytest.mark.parametrize("merged, dtype", [(True, torch.float64), (False, torch.float64), (True, torch.bfloat16)],
                         ids=["merged", "two_launches", "bf16"])
def test_group_bitwise_equals_one_by_one(merged, dtype, kernels_module, small_tiles, monkeypatch):
    """fold_batch_norms on the kernels: one statistics launch (+ one finalize), one backward launch for the three
    folds, every output, gradient and running statistic bitwise equal to the folds one at a time (the same
    per-term arithmetic); in float64 also equal to nn.BatchNorm2d (bf16 z, fp32 modules: the bitwise part)."""
    monkeypatch.setattr(kernels_module, "MERGED_FINALIZE", merged)
    bns, zs = _group_case(dtype, torch.float64 if dtype == torch.float64 else torch.float32)
    refs = [copy.deepcopy(bn) for bn in bns]
    singles = [copy.deepcopy(bn) for bn in bns]
    gs = [torch.randn(z.shape, dtype=torch.float64) for z in zs]
    counts = {}
    for name in ("_bn_stats_kernel", "_bn_finalize_kernel", "_bn_backward_kernel"):
        monkeypatch.setattr(kernels_module, name, _Counting(getattr(kernels_module, name), counts, name))
    grouped = _run_folds(bns, zs, gs, grouped=True)
    assert counts == {"_bn_stats_kernel": 1, "_bn_backward_kernel": 1, **({} if merged else {"_bn_finalize_kernel": 1})}
    alone = _run_folds(singles, zs, gs, grouped=False)
    assert counts["_bn_stats_kernel"] == 4 and counts["_bn_backward_kernel"] == 4
    assert len(grouped) == len(alone)
    for a, b in zip(grouped, alone):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
    if dtype != torch.float64:
        return
    zr = [z.clone().requires_grad_() for z in zs]
    ys = [ref(z) for ref, z in zip(refs, zr)]
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()
    tol = tolerance(torch.float64)
    for k, (bn, ref) in enumerate(zip(bns, refs)):
        assert_rel_close(grouped[9 + k], ys[k], tol, f"output {k}")
        assert_rel_close(grouped[12 + k], zr[k].grad, tol, f"grad z {k}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(ref, name) is not None:
                assert_rel_close(getattr(bn, name).double(), getattr(ref, name).double(), tol, f"{name} {k}")
        if ref.weight is not None:
            assert_rel_close(bn.weight.grad, ref.weight.grad, tol, f"grad weight {k}")
            assert_rel_close(bn.bias.grad, ref.bias.grad, tol, f"grad bias {k}")
    assert all(int(t.abs().sum()) == 0 for t in kernels_module._TICKETS.values())


def test_group_splits_where_a_launch_cannot_hold_the_terms(kernels_module, monkeypatch):
    """Launch groups: at most MAX_TERMS folds, one accumulation dtype, eps and (among tracked) factor per
    launch; the same module twice in two launches, in order (its second update sees the first). Results bitwise
    as one by one (fp32 and fp64 modules, momentum None after other step counts)."""
    monkeypatch.setattr(kernels_module, "MAX_TERMS", 2)
    monkeypatch.setattr(kernels_module, "MERGED_FINALIZE", True)
    torch.manual_seed(2)
    shared = _bn(3)[0]
    bns = [_bn(3)[0], _bn(3)[0], _bn(3)[0], _bn(3, momentum=None)[0], _bn(3, dtype=torch.float32)[0], shared,
           shared, _bn(3, eps=1e-3)[0]]
    bns[3].num_batches_tracked.fill_(4)  # factor 1/5, not the others' 0.1
    zs = [_z((2, 3, 4, 5), torch.float32 if k == 4 else torch.float64) for k in range(len(bns))]
    gs = [torch.randn(z.shape, dtype=z.dtype) for z in zs]
    singles = copy.deepcopy(bns)
    assert singles[5] is singles[6]
    counts = {}
    for name in ("_bn_stats_kernel", "_bn_backward_kernel"):
        monkeypatch.setattr(kernels_module, name, _Counting(getattr(kernels_module, name), counts, name))
    grouped = _run_folds(bns, zs, gs, grouped=True)
    # statistics [0, 1] [2] [3: factor] [4: fp32] [5] [6: same module] [7: eps]; backward (no updates, dtype
    # only) [0, 1] [2, 3] [4] [5, 6] [7]
    assert counts == {"_bn_stats_kernel": 7, "_bn_backward_kernel": 5}
    alone = _run_folds(singles, zs, gs, grouped=False)
    for a, b in zip(grouped, alone):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_error_after_earlier_folds(impl):
    """A term that cannot fold (one value per channel) raises as batch norm does, after the folds before it ran
    with their side effects (running statistics, counters), as folding one by one would."""
    bn0, ref0 = _bn(3)
    bn1, ref1 = _bn(3)
    z0, z1 = _z((2, 3, 4, 5)), _z((1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fold_batch_norms([bn0, bn1], [z0, z1], use_kernels=impl == "kernels")
    ref0(z0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref1(z1)
    tol = tolerance(torch.float64)
    assert_rel_close(bn0.running_mean, ref0.running_mean, tol, "running_mean")
    assert_rel_close(bn0.running_var, ref0.running_var, tol, "running_var")
    assert bn0.num_batches_tracked.item() == ref0.num_batches_tracked.item() == 1
    assert bn1.num_batches_tracked.item() == ref1.num_batches_tracked.item() == 1
    assert torch.equal(bn1.running_mean, ref1.running_mean)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_term_dtypes(impl):
    """term_dtype per fold (a fusion step's rows may promote to different dtypes): each term in its own dtype,
    the same results as folding one at a time with that dtype; a wrong count or type is refused."""
    torch.manual_seed(3)
    bns = [_bn(4)[0], _bn(4)[0]]
    singles = copy.deepcopy(bns)
    zs = [_z((2, 4, 3, 5), torch.float32), _z((2, 4, 2, 3), torch.float32)]
    grouped = fold_batch_norms(bns, zs, [torch.float64, None], use_kernels=impl == "kernels")
    alone = [fold_batch_norm(bn, z, dtype, use_kernels=impl == "kernels")
             for bn, z, dtype in zip(singles, zs, [torch.float64, None])]
    assert [r[0].dtype for r in grouped] == [torch.float64, torch.float32]
    for a, b in zip(grouped, alone):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y)
    with pytest.raises(ValueError, match="term_dtype holds 1 dtypes for 2 inputs"):
        fold_batch_norms(bns, zs, [torch.float64])
    with pytest.raises(TypeError, match="term_dtype must be a torch.dtype"):
        fold_batch_norms(bns, zs, "float64")
