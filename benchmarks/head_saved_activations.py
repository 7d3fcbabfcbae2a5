#!/usr/bin/env python
"""python benchmarks/head_saved_activations.py: the bytes autograd keeps for the backward of the W48 head
(shapes scaled to x0 16x32), training mode: hrfast's Triton path (interpreter) against eager
(hrfast.ops.head_ref, the unpatched computation). Activations = saved storages that are not inputs or
parameters (tensors the custom ops save through ctx.save_for_backward go through the same hooks)."""
import os
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
from hrfast.ops import Resample, head_ref, hrnet_v2_head

torch.manual_seed(0)
C, (H, W), M, K = (48, 96, 192, 384), (16, 32), 720, 19
xs = [torch.randn(2, c, H >> j, W >> j, requires_grad=True) for j, c in enumerate(C)]
p = dict(conv_weight=torch.randn(M, sum(C), 1, 1) * 0.05, conv_bias=torch.randn(M), running_mean=torch.zeros(M),
         running_var=torch.ones(M), bn_weight=torch.rand(M) + 0.5, bn_bias=torch.randn(M),
         cls_weight=torch.randn(K, M, 1, 1) * 0.05, cls_bias=torch.randn(K))
for n in ("conv_weight", "conv_bias", "bn_weight", "bn_bias", "cls_weight", "cls_bias"):
    p[n].requires_grad_()
inputs = {t.untyped_storage().data_ptr() for t in xs + list(p.values())}


def saved_bytes(run):
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    acts = sum(n for ptr, n in storages.items() if ptr not in inputs)
    return acts, sum(storages.values()), out


bil = Resample("bilinear", align_corners=False)
eager = saved_bytes(lambda: head_ref(xs, p["conv_weight"], p["conv_bias"], p["running_mean"].clone(),
                                     p["running_var"].clone(), p["bn_weight"], p["bn_bias"], p["cls_weight"],
                                     p["cls_bias"], [None] + [bil] * 3, True, 0.1, 1e-5))
fused = saved_bytes(lambda: hrnet_v2_head(xs, p["conv_weight"], p["conv_bias"], p["running_mean"].clone(),
                                          p["running_var"].clone(), p["bn_weight"], p["bn_bias"], p["cls_weight"],
                                          p["cls_bias"], training=True, backend="triton"))
print(f"eager: activations {eager[0]/1e6:.2f} MB (all saved {eager[1]/1e6:.2f} MB)")
print(f"hrfast triton: activations {fused[0]/1e6:.2f} MB (all saved {fused[1]/1e6:.2f} MB)")
print(f"ratio activations {fused[0]/eager[0]:.3f}, all saved {fused[1]/eager[1]:.3f}")
print("max |diff| logits", (eager[2] - fused[2]).abs().max().item())
