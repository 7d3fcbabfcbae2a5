"""The fusion kernels' tiling (issue 18): 3-D [channels x rows x columns] tiles with clamped tails, channel
blocks fitted to HRNet's channel counts, the adjoint's tiles, and the masked gradient g returned as the
gradient of an unscaled output-size term. Values against the float64 reference through `check_fuse`
(tests/test_fuse_op.py's harness), on shapes that span several tiles on every axis with ragged tails."""
import pytest
import torch

from hrfast.kernels.resample import cdiv, channel_block

from test_fuse_op import BF16, CL, F32, F64, Case, _build, _kernel_args, bil, check_fuse, near

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
