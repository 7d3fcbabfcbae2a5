"""Bad inputs of the public ops, one row each: the call, the exception type and a fragment of its message.

Every tensor argument of `hrfast.ops.fuse` and `hrfast.ops.hrnet_v2_head` is checked for type, layout, dtype,
shape and device before any backend runs: TypeError for a wrong type, layout or dtype, ValueError for a wrong
shape, size or device, each naming the argument and what was expected. The rows run on CPU (and meta) tensors
with the default backend; validation does not depend on the backend.

The last section holds edge inputs that are *not* errors: an output never aliases an input, and the reference
path takes any batch (the CUDA grid's 65,535 limit belongs to the kernel launchers).
"""
import pytest
import torch

import hrfast
from hrfast.ops import Resample, fuse, fuse_ref, hrnet_v2_head

from optest import conv_weight, head_branch, small_head

BF16, F64 = torch.bfloat16, torch.float64


def near(scale_factor=None) -> Resample:
    return Resample("nearest", scale_factor=scale_factor)


def bil(scale_factor=None, align_corners=None) -> Resample:
    return Resample("bilinear", align_corners=align_corners, scale_factor=scale_factor)


def _fx(N=2, C=3, H=4, W=4, **kw):
    """A fusion term: 3 channels, 4x4."""
    return torch.randn(N, C, H, W, **kw)


_hx, _w, _head = head_branch, conv_weight, small_head  # the builders the head op's tests share (optest)


# -------------------------------------------------------------------------------------------- hrfast.ops.fuse

FUSE_CASES = [
    (lambda: fuse(_fx()), TypeError, r"inputs must be a list or tuple of tensors"),
    (lambda: fuse([]), ValueError, r"inputs must hold at least one tensor"),
    (lambda: fuse([_fx(), 3.0]), TypeError, r"inputs\[1\] must be a torch.Tensor"),
    (lambda: fuse([torch.randn(2, 3, 4)]), ValueError, r"inputs\[0\] must be 4-D"),
    (lambda: fuse([_fx(), torch.ones(2, 3, 4, 4, dtype=torch.int64)]), TypeError, r"inputs\[1\] has dtype torch.int64"),
    (lambda: fuse([_fx(), _fx(dtype=F64)]), TypeError, r"inputs\[1\] has dtype torch.float64 but inputs\[0\]"),
    (lambda: fuse([_fx(), _fx(N=3)]), ValueError, r"inputs\[1\] has batch 3 but inputs\[0\] has 2"),
    (lambda: fuse([_fx(), _fx(C=2)]), ValueError, r"inputs\[1\] has 2 channels but inputs\[0\] has 3"),
    (lambda: fuse([_fx(), _fx(device="meta")]), ValueError, r"inputs\[1\] is on meta"),
    # scales / shifts
    (lambda: fuse([_fx()], scales=torch.ones(3)), TypeError, r"scales must be a list"),
    (lambda: fuse([_fx(), _fx()], scales=[torch.ones(3)]), ValueError, r"scales has 1 entries but there are 2 inputs"),
    (lambda: fuse([_fx()], scales=[1.0]), TypeError, r"scales\[0\] must be a tensor or None"),
    (lambda: fuse([_fx()], scales=[torch.ones(3, dtype=torch.int32)]), TypeError, r"scales\[0\] has dtype torch.int32"),
    (lambda: fuse([_fx(), _fx()], scales=[None, torch.ones(4)]), ValueError, r"scales\[1\] must have shape \[3\]"),
    (lambda: fuse([_fx()], scales=[torch.ones(1, 3)]), ValueError, r"scales\[0\] must have shape \[3\]"),
    (lambda: fuse([_fx()], scales=[torch.ones(3, device="meta")]), ValueError, r"scales\[0\] is on meta"),
    (lambda: fuse([_fx()], shifts=(torch.ones(3), None)), ValueError, r"shifts has 2 entries but there are 1 inputs"),
    (lambda: fuse([_fx()], shifts=[torch.ones(3, dtype=torch.bool)]), TypeError, r"shifts\[0\] has dtype torch.bool"),
    (lambda: fuse([_fx()], shifts=[torch.ones(())]), ValueError, r"shifts\[0\] must have shape \[3\]"),
    (lambda: fuse([_fx()], shifts=["1"]), TypeError, r"shifts\[0\] must be a tensor or None"),
    # resample
    (lambda: fuse([_fx(), _fx(H=2, W=2)], resample=[None, 2]), TypeError,
     r"resample\[1\] must be None, a mode string or hrfast.ops.Resample"),
    (lambda: fuse([_fx(), _fx(H=2, W=2)], resample=[None, "bicubic"]), ValueError, r"Resample.mode must be one of"),
    (lambda: fuse([_fx(), _fx(H=2, W=2)], resample=["nearest"]), ValueError, r"resample has 1 entries"),
    (lambda: fuse([_fx(), _fx(H=2, W=2)], resample="nearest"), TypeError, r"resample must be a list"),
    (lambda: fuse([_fx(), _fx(H=3, W=4)]), ValueError, r"inputs\[1\] is 3x4 but the output is 4x4; give resample\[1\]"),
    (lambda: fuse([_fx(), _fx(H=5, W=3)], resample=[None, "bilinear"]), ValueError,
     r"inputs\[1\] is 5x3, larger than the output 4x4"),
    (lambda: fuse([_fx(H=5, W=5), _fx(H=2, W=2)], resample=[None, near(2)]), ValueError,
     r"resample\[1\] with scale_factor=2 turns 2x2 into 4x4, not the output size 5x5"),
    (lambda: fuse([_fx(H=2, W=2)], resample=[near(2)], size=(4, 5)), ValueError,
     r"resample\[0\] with scale_factor=2"),
    (lambda: fuse([_fx(), _fx(H=0, W=2)], resample=[None, "nearest"]), ValueError, r"inputs\[1\] has an empty spatial"),
    (lambda: fuse([_fx(H=1, W=1)], resample=["nearest"], size=(2**16, 2**15)), ValueError, r"2\*\*31 or more pixels"),
    # size
    (lambda: fuse([_fx(H=2, W=2)], resample=["nearest"]), ValueError, r"size is required when every input has"),
    (lambda: fuse([_fx(H=2, W=2)], resample=["nearest"], size=4), TypeError, r"size must be a pair of ints"),
    (lambda: fuse([_fx(H=2, W=2)], resample=["nearest"], size=(4.0, 4)), TypeError, r"size must be a pair of ints"),
    (lambda: fuse([_fx(H=2, W=2)], resample=["nearest"], size=(4, 4, 4)), TypeError, r"size must be a pair of ints"),
    (lambda: fuse([_fx(H=2, W=2)], resample=["nearest"], size=(True, 4)), TypeError, r"size must be a pair of ints"),
    (lambda: fuse([_fx(H=2, W=2)], resample=["nearest"], size=(0, 4)), ValueError, r"size must be positive"),
    (lambda: fuse([_fx()], size=(5, 5)), ValueError, r"inputs\[0\] is 4x4 but the output is 5x5"),
    # backend, relu
    (lambda: fuse([_fx()], backend="cuda_graphs"), ValueError, r"backend must be one of"),
    (lambda: fuse([_fx()], backend=None), ValueError, r"backend must be one of"),
    (lambda: fuse([_fx()], relu=1), TypeError, r"relu must be a bool"),
    (lambda: fuse([_fx()], relu=None), TypeError, r"relu must be a bool"),
    # layouts, empty channels, size entries
    (lambda: fuse([_fx().to_sparse()]), TypeError, r"inputs\[0\] has layout torch.sparse_coo; expected a dense"),
    (lambda: fuse([_fx(dtype=torch.complex64)]), TypeError, r"inputs\[0\] has dtype torch.complex64; expected"),
    (lambda: fuse([_fx()], scales=[torch.ones(3).to_sparse()]), TypeError, r"scales\[0\] has layout torch.sparse"),
    (lambda: fuse([_fx(device="meta")], shifts=[torch.ones(3)]), ValueError,
     r"shifts\[0\] is on cpu but the inputs are on meta"),
    (lambda: fuse([_fx(C=0), _fx(C=0, H=2, W=2)], resample=[None, "bilinear"]), ValueError,
     r"inputs have 0 channels; a resampled term needs at least one"),
    (lambda: fuse([_fx(H=2, W=2)], resample=["nearest"], size=(torch.tensor(4.0), 4)), TypeError,
     r"size must be a pair of ints"),
]


@pytest.mark.parametrize("call, exc, match", FUSE_CASES, ids=[f"{e.__name__}:{m[:40]}" for _, e, m in FUSE_CASES])
def test_fuse_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------ hrfast.ops.hrnet_v2_head

HEAD_CASES = [
    # xs
    (lambda: _head(xs=_hx()), TypeError, r"xs must be a list or tuple of tensors, got Tensor"),
    (lambda: _head(xs=[]), ValueError, r"xs must hold 1 to 4 branch tensors.*got 0"),
    (lambda: _head(xs=[_hx(C=2)] * 5, cw=_w(C=10)), ValueError, r"xs must hold 1 to 4 branch tensors.*got 5"),
    (lambda: _head(xs=[_hx(), "x1"]), TypeError, r"xs\[1\] must be a torch.Tensor, got str"),
    (lambda: _head(xs=[_hx(), torch.randn(2, 6, 2)]), ValueError, r"xs\[1\] must be 4-D"),
    (lambda: _head(xs=[torch.randn(4, 4, 4)]), ValueError, r"xs\[0\] must be 4-D"),
    (lambda: _head(xs=[_hx(), torch.ones(2, 6, 2, 2, dtype=torch.int64)]), TypeError,
     r"xs\[1\] has dtype torch.int64; expected"),
    (lambda: _head(xs=[torch.ones(2, 4, 4, 4, dtype=torch.int32), _hx(C=6, H=2, W=2)]), TypeError,
     r"xs\[0\] has dtype torch.int32"),
    (lambda: _head(xs=[_hx(), _hx(C=6, H=2, W=2, dtype=F64)]), TypeError,
     r"xs\[1\] has dtype torch.float64 but xs\[0\] has torch.float32"),
    (lambda: _head(xs=[_hx(), _hx(N=3, C=6, H=2, W=2)]), ValueError, r"xs\[1\] has batch 3 but xs\[0\] has 2"),
    (lambda: _head(xs=[_hx(), _hx(C=6, H=2, W=2, device="meta")]), ValueError, r"xs\[1\] is on meta"),
    (lambda: _head(xs=[_hx(), _hx(C=6, H=5, W=2)]), ValueError, r"xs\[1\] is \(5, 2\), larger than xs\[0\] \(4, 4\)"),
    (lambda: _head(xs=[_hx(), _hx(C=6, H=2, W=5)]), ValueError, r"xs\[1\] is \(2, 5\), larger than xs\[0\]"),
    (lambda: _head(xs=[_hx(), _hx(C=6, H=0, W=2)]), ValueError, r"xs\[1\] has an empty spatial size \(0, 2\)"),
    # conv_weight / cls_weight
    (lambda: _head(cw=[[1.0]]), TypeError, r"conv_weight must be a tensor, got list"),
    (lambda: _head(cw=_w(C=9)), ValueError, r"conv_weight takes 9 input channels but the branches have \[4, 6\] "
                                            r"channels, 10 in all"),
    (lambda: _head(cw=_w(k=3)), ValueError, r"conv_weight must be a 1x1 conv weight \[out, in, 1, 1\], got "
                                            r"\(8, 10, 3, 3\)"),
    (lambda: _head(cw=torch.randn(8, 10)), ValueError, r"conv_weight must be a 1x1 conv weight"),
    (lambda: _head(cw=_w(device="meta")), ValueError, r"conv_weight is on meta"),
    (lambda: _head(kw="none"), TypeError, r"cls_weight must be a tensor, got NoneType"),
    (lambda: _head(kw=torch.randn(3, 8, 1, 3)), ValueError, r"cls_weight must be a 1x1 conv weight"),
    (lambda: _head(kw=_w(M=3, C=7)), ValueError, r"cls_weight takes 7 input channels but conv_weight has 8 output"),
    (lambda: _head(kw=_w(M=3, C=8, device="meta")), ValueError, r"cls_weight is on meta"),
    # biases
    (lambda: _head(cb=torch.randn(7)), ValueError, r"conv_bias must be None or a \[8\] tensor, got \(7,\)"),
    (lambda: _head(cb=torch.randn(8, 1)), ValueError, r"conv_bias must be None or a \[8\] tensor"),
    (lambda: _head(cb=[0.0] * 8), ValueError, r"conv_bias must be None or a \[8\] tensor, got list"),
    (lambda: _head(kb=torch.randn(8)), ValueError, r"cls_bias must be None or a \[3\] tensor, got \(8,\)"),
    # batch norm
    (lambda: _head(rm=torch.zeros(7)), ValueError, r"running_mean must be None or a \[8\] tensor"),
    (lambda: _head(rv=torch.ones(1, 8)), ValueError, r"running_var must be None or a \[8\] tensor"),
    (lambda: _head(bw=torch.ones(10)), ValueError, r"bn_weight must be None or a \[8\] tensor"),
    (lambda: _head(bb=torch.ones(())), ValueError, r"bn_bias must be None or a \[8\] tensor"),
    (lambda: _head(bb=1.0), ValueError, r"bn_bias must be None or a \[8\] tensor.*got float"),
    (lambda: _head(bw=torch.ones(8, device="meta")), ValueError, r"bn_weight is on meta"),
    (lambda: _head(rv="none"), ValueError, r"running_mean and running_var must both be given or both be None"),
    (lambda: _head(rm="none"), ValueError, r"running_mean and running_var must both be given or both be None"),
    (lambda: _head(training=1), TypeError, r"training must be a bool"),
    # resample
    (lambda: _head(resample=["nearest", "bilinear"]), ValueError,
     r"resample has 2 entries but there are 1 low-resolution branches"),
    (lambda: _head(resample=[]), ValueError, r"resample has 0 entries"),
    (lambda: _head(resample=[2]), TypeError, r"resample\[0\] must be None, a mode string or hrfast.ops.Resample"),
    (lambda: _head(resample=2.0), TypeError, r"resample must be None, a mode string or hrfast.ops.Resample"),
    (lambda: _head(resample="bicubic"), ValueError, r"Resample.mode must be one of"),
    (lambda: _head(resample=[None]), ValueError, r"xs\[1\] is \(2, 2\) but xs\[0\] is \(4, 4\); give it a resample"),
    (lambda: _head(xs=[_hx(H=5, W=5), _hx(C=6, H=2, W=2)], resample=near(2)), ValueError,
     r"resample for xs\[1\] \(scale_factor=2\) gives \(4, 4\), not xs\[0\]'s size \(5, 5\)"),
    (lambda: _head(xs=[_hx(H=4, W=4), _hx(C=6, H=2, W=2)], resample=[bil(4)]), ValueError,
     r"resample for xs\[1\] \(scale_factor=4\) gives \(8, 8\)"),
    # backend
    (lambda: _head(backend="cuda_graphs"), ValueError, r"backend must be one of"),
    (lambda: _head(backend=None), ValueError, r"backend must be one of"),
    # dtype and device of every parameter (eager conv2d rejects weights of another dtype; F.batch_norm takes
    # float32 statistics with a half-precision input only)
    (lambda: _head(cw=_w(dtype=F64)), TypeError, r"conv_weight has dtype torch.float64; expected torch.float32"),
    (lambda: _head(kw=_w(M=3, C=8, dtype=torch.float16)), TypeError, r"cls_weight has dtype torch.float16"),
    (lambda: _head(kw=torch.ones(3, 8, 1, 1, dtype=torch.int64)), TypeError,
     r"cls_weight has dtype torch.int64; expected a floating dtype"),
    (lambda: _head(cb=torch.randn(8, dtype=F64)), TypeError, r"conv_bias has dtype torch.float64; expected"),
    (lambda: _head(kb=torch.randn(3, dtype=torch.bfloat16)), TypeError, r"cls_bias has dtype torch.bfloat16"),
    (lambda: _head(cb=torch.randn(8, device="meta")), ValueError, r"conv_bias is on meta but the inputs are on cpu"),
    (lambda: _head(kb=torch.randn(3, device="meta")), ValueError, r"cls_bias is on meta but the inputs are on cpu"),
    (lambda: _head(rm=torch.zeros(8, dtype=F64)), TypeError, r"running_mean has dtype torch.float64; expected "
                                                            r"torch.float32"),
    (lambda: _head(rv=torch.ones(8, dtype=torch.int64)), TypeError, r"running_var has dtype torch.int64"),
    (lambda: _head(bb=torch.zeros(8, device="meta")), ValueError, r"bn_bias is on meta"),
    (lambda: _head(xs=[_hx(dtype=BF16), _hx(C=6, H=2, W=2, dtype=BF16)], cw=_w(dtype=BF16), cb="none",
                   kw=_w(M=3, C=8, dtype=BF16), kb="none", rm=torch.zeros(8, dtype=F64)), TypeError,
     r"running_mean has dtype torch.float64; expected torch.bfloat16 or torch.float32"),
    (lambda: _head(cw=_w().to_sparse()), TypeError, r"conv_weight has layout torch.sparse_coo"),
    (lambda: _head(momentum="0.1"), TypeError, r"momentum must be a number, got str"),
    (lambda: _head(eps=-1e-5), ValueError, r"eps must be a non-negative number"),
    (lambda: _head(eps=float("nan")), ValueError, r"eps must be a non-negative number"),
    # empty channels
    (lambda: _head(xs=[_hx(), _hx(C=0, H=2, W=2)], cw=_w(C=4)), ValueError,
     r"xs\[1\] has 0 channels; a resampled branch needs at least one"),
]


@pytest.mark.parametrize("call, exc, match", HEAD_CASES, ids=[f"{e.__name__}:{m[:40]}" for _, e, m in HEAD_CASES])
def test_head_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------- accepted edge inputs


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
@pytest.mark.parametrize("N", [2, 0], ids=["batch2", "empty"])
def test_output_never_aliases_an_input(backend, N):
    """One plain term without ReLU is the identity: the result is still a fresh tensor (writing into it must not
    change the input), as every output of an op is."""
    x = _fx(N=N)
    y = fuse([x], relu=False, backend=backend)
    assert torch.equal(y, x)
    assert y.data_ptr() != x.data_ptr() or x.numel() == 0
    assert y is not x
    assert fuse_ref([x], [None], [None], [None], (4, 4), relu=False) is not x


def test_output_of_one_term_keeps_its_layout():
    x = _fx().contiguous(memory_format=torch.channels_last)
    y = fuse([x], relu=False)
    assert y.is_contiguous(memory_format=torch.channels_last) and y is not x


def test_reference_takes_any_batch():
    """The reference path has no grid: 65,536 images and more run (the Triton and CUDA launchers refuse what
    their grid cannot hold)."""
    x = torch.randn(65536, 1, 1, 1)
    assert torch.equal(fuse([x, x], relu=False, backend="reference"), x + x)
    xs = [torch.empty(65536, 4, 2, 2, device="meta"), torch.empty(65536, 6, 1, 1, device="meta")]
    logits = hrnet_v2_head(xs, _w(device="meta"), None, None, None, None, None, _w(M=3, C=8, device="meta"),
                           backend="reference")
    assert logits.shape == (65536, 3, 2, 2)


def test_head_weights_of_another_dtype_under_autocast():
    """Under autocast eager casts the convs' weights, so the fused head takes them in any floating dtype."""
    xs = [_hx(dtype=BF16), _hx(C=6, H=2, W=2, dtype=BF16)]
    with torch.autocast("cpu", dtype=BF16):
        logits = _head(xs=xs)
        eager = _head(xs=xs, backend="reference")
    assert logits.dtype == BF16 and logits.shape == (2, 3, 4, 4) and eager.dtype == BF16
