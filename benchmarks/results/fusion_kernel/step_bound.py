"""The training fusion step's floor under the instrument's cost model: how fast any design could be.

    python benchmarks/results/fusion_kernel/step_bound.py [--arch sm_90] [--dtype bf16]

Issue 18 asks for the W48 stage-4 step (four output rows, 512x1024 b8 training) at >= 3x eager forward +
backward. Eager's figure (`hrfast.perf.eager.eager_fuse`) counts its batch norms, so the step compared with it
counts hrfast's batch-norm work too (statistics, their backward). This prints, per phase, eager's bytes and
launches, the compulsory bytes of a fused design, and the step time the cost model gives that design for a
number of launches (4 us each, as eager's): the launch budget a 3x step has.

Compulsory bytes of a fused design, per output row with output elements `out`, terms of `e_j` elements:
- forward: the batch statistics read every normalised term once; the fused kernel reads every term once and
  writes y once, and the ReLU's mask as bits (out / 8 bytes; `fuse_forward_rows_with_bits`, since stop 29:
  until then the backward read y for it).
- backward: dy and the ReLU bits read, g = dx of the row's own branch written once; the upsampled terms'
  adjoint reads g once for all of them (one launch per row at best), reads z_j for the BN sums and writes dz_j;
  BN's backward then reads dz_j and z_j and writes dx_j (5 e_j per upsampled term in all); each strided-down
  (output-size) term: its BN sums read z_j (g still in registers) and its BN backward reads g and z_j and
  writes dx_j (4 out).
The recorded launches of today's step (`stage4_rows.record_training_step`) are counted beside it.

The launch floor: a grid-wide reduction must finish before the launch that consumes it starts, and the step has
a chain of them: the batch statistics (every z) before the forward (scale, shift); the ReLU-masked g, which
the adjoint reads in windows that other programs wrote, before the adjoint (unless it re-reads dy and y
instead of g, more bytes than a launch costs); the dscale / dshift sums before the BN backward (its dz needs
them in every element). A last-program finalize (a ticket: `MERGED_FINALIZE`) can close a reduction inside the
launch that produces its partials, so the floor is 5 launches: statistics | forward | g | adjoint (+ partial
sums) | BN backward, each for all four rows at once. Priced at the compulsory bytes and at the bytes of
today's kernels (their sum over the recorded step). Predictions.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hrfast.perf import eager  # noqa: E402
from hrfast.perf.arch import LAUNCH_SECONDS  # noqa: E402
from stage4_rows import branch_problem, cost_rows, record_training_step, step_arguments, step_setup  # noqa: E402


def compulsory_bytes(plan, shapes, size):
    """(forward, backward) compulsory bytes of one row, elements of `size` bytes (see the module docstring)."""
    out, terms = eager._fuse_terms(plan, shapes)
    ups = [e for e, up, _ in terms if up]
    downs = [e for e, up, bn in terms if bn and not up]
    forward = sum(e for e, _, bn in terms if bn) + sum(e for e, _, _ in terms) + out
    backward = 2 * out + (out if ups else 0) + sum(5 * e for e in ups) + sum(4 * e for e in downs)
    return forward * size + out / 8, backward * size + out / 8


def main(argv=None):
    args = step_arguments().parse_args(argv)
    args.training = True
    arch, H, W, N, dtype = step_setup(args)
    size = {"fp32": 4, "bf16": 2, "fp16": 2}[args.dtype]
    bw = arch.achievable_hbm_bytes_per_s
    eager_ops = {"forward": [], "backward": []}
    ideal = {"forward": 0, "backward": 0}
    for b in range(4):
        plan, xs, _, _ = branch_problem(b, H, W, N, dtype, args.channels_last)
        shapes = [tuple(x.shape) for x in xs]
        for phase, ops in eager.eager_fuse(plan, shapes, dtype, True).items():
            eager_ops[phase] += ops
        for phase, b in zip(("forward", "backward"), compulsory_bytes(plan, shapes, size)):
            ideal[phase] += b
    step = record_training_step(dtype, args.channels_last)
    today = {p: sum(len(phases[p]) + len(aten.get(p, [])) for _, _, phases, aten in step)
             for p in ("forward", "backward")}
    print(f"# {arch.name}, {args.dtype}, W48 stage-4 fusion step, 512x1024 b8 training (predictions)")
    print("| phase | eager MB | eager launches | eager us | fused compulsory MB | its bytes us | today's launches |")
    print("|---|---|---|---|---|---|---|")
    e_total = 0.0
    for p in ("forward", "backward"):
        e_us = eager.seconds(arch, eager_ops[p]) * 1e6
        e_total += e_us
        print(f"| {p} | {sum(o.bytes for o in eager_ops[p]) / 1e6:.1f} | {len(eager_ops[p])} | {e_us:.1f} | "
              f"{ideal[p] / 1e6:.1f} | {ideal[p] / bw * 1e6:.1f} | {today[p]} |")
    floor_us = sum(ideal.values()) / bw * 1e6
    budget = int((e_total / 3 - floor_us) * 1e-6 / LAUNCH_SECONDS)
    verdict = f"3x leaves {budget} launches for the whole step" if budget >= 0 else \
        "3x is out of reach even with no launch"
    print(f"\nEager fwd+bwd {e_total:.1f} us; 3x means <= {e_total / 3:.1f} us. The fused design's bytes alone take "
          f"{floor_us:.1f} us ({e_total / floor_us:.2f}x eager with no launch at all), so {verdict} "
          f"(today's step: {sum(today.values())} launches and ATen ops).\n")
    print("| launches | step us (compulsory bytes + launches) | vs eager |")
    print("|---|---|---|")
    for launches in (5, 7, 8, 12, 16, 20, 26, sum(today.values())):
        us = floor_us + launches * LAUNCH_SECONDS * 1e6
        print(f"| {launches} | {us:.1f} | {e_total / us:.2f}x |")
    # today's kernels' own bytes (ATen ops left out: the grouped step has none to speak of)
    rows = [r for _, _, phases, _ in step for p in ("forward", "backward") for r in cost_rows(arch, phases[p])]
    today_bytes_us = sum(r["bytes_us"] for r in rows)
    floor = 5
    print(f"\nLaunch floor (module docstring): {floor} launches. At the compulsory bytes "
          f"{floor_us + floor * LAUNCH_SECONDS * 1e6:.1f} us "
          f"({e_total / (floor_us + floor * LAUNCH_SECONDS * 1e6):.2f}x eager); at today's kernels' bytes "
          f"({today_bytes_us:.1f} us over {len(rows)} launches) {today_bytes_us + floor * LAUNCH_SECONDS * 1e6:.1f}"
          f" us ({e_total / (today_bytes_us + floor * LAUNCH_SECONDS * 1e6):.2f}x eager). 3x needs the kernels' "
          f"bytes <= {e_total / 3 - floor * LAUNCH_SECONDS * 1e6:.1f} us with {floor} launches.")


if __name__ == "__main__":
    main()
