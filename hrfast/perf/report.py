"""Rendering of an inspect report (`inspect.analyse`'s dict): a terminal table, markdown, JSON."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable, List, Optional, Sequence

US = 1e6


def _us(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * US:,.1f}"


def _x(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f}"


def _per_element(value: Optional[float]) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _loop(row: dict) -> str:
    loop = row["main_loop"]
    return "none" if loop is None else f"{loop['sass_per_warp_iteration']} x {loop['trips_per_program']:g}"


def _phases(by_phase: dict) -> float:
    return sum(by_phase.values())


VARIANT_COLUMNS = [
    ("kernel", lambda r: r["kernel"]),
    ("key constexprs", lambda r: r["key"]),
    ("launches", lambda r: str(r["launches"])),
    ("programs", lambda r: f"{r['programs']:,}"),
    ("regs", lambda r: str(r["registers"])),
    ("spill st/ld B", lambda r: f"{r['spill_stores']}/{r['spill_loads']}"),
    ("stack B", lambda r: str(r["stack"])),
    ("shared B / limit", lambda r: f"{r['shared']:,} / {r['shared_limit']:,}"),
    ("launch", lambda r: "FAILS" if r["launch_failure"] else "ok"),
    ("warps/SM (limiter)", lambda r: f"{r['warps_per_sm']} ({r['occupancy_limiter']})"),
    ("main loop SASS/warp x trips", _loop),
    ("issued/elem", lambda r: _per_element(r["instructions_per_element"])),
    ("MB", lambda r: _mb(r["bytes"])),
    ("predicted us", lambda r: _us(r["predicted_s"])),
    ("limiter", lambda r: r["limiter"]),
]

OP_COLUMNS = [
    ("op call", lambda r: r["op"]),
    ("calls", lambda r: str(r["calls"])),
    ("hrfast kernels us", lambda r: _us(_phases(r["kernels_s"]))),
    ("hrfast ATen ops us", lambda r: _us(_phases(r["glue_s"]))),
    ("hrfast us", lambda r: _us(r["hrfast_s"])),
    ("eager us", lambda r: _us(_phases(r["eager_s"]))),
    ("compile us", lambda r: _us(_phases(r["compile_s"]))),
    ("vs eager", lambda r: _x(r["ratio_eager"])),
    ("vs compile", lambda r: _x(r["ratio_compile"])),
    ("cannot launch", lambda r: ", ".join(r["cannot_launch"]) or "-"),
]

CUDA_COLUMNS = [
    ("op call", lambda r: r["op"]),
    ("kernel", lambda r: r["kernel"]),
    ("phase", lambda r: r["phase"]),
    ("regs", lambda r: str(r["registers"])),
    ("spill st/ld B", lambda r: f"{r['spill_stores']}/{r['spill_loads']}"),
    ("warps/SM", lambda r: str(r["warps_per_sm"])),
    ("SASS/elem per thread (bound)", lambda r: _per_element(r["thread_instructions_per_element"])),
    ("issued/elem", lambda r: _per_element(r["instructions_per_element"])),
    ("MB", lambda r: _mb(r["bytes"])),
    ("predicted us", lambda r: _us(r["predicted_s"])),
    ("limiter", lambda r: r["limiter"]),
]

CUDA_OP_COLUMNS = [
    ("op call", lambda r: r["op"]),
    ("calls", lambda r: str(r["calls"])),
    ("CUDA C++ kernels us", lambda r: _us(r["kernels_s"])),
    ("Triton kernels us", lambda r: _us(r["triton_kernels_s"])),
]

TOTAL_COLUMNS = [
    ("part", lambda r: r["part"]),
    ("hrfast us", lambda r: _us(r["hrfast_s"])),
    ("of which kernels us", lambda r: _us(r["kernels_s"])),
    ("eager us", lambda r: _us(r["eager_s"])),
    ("compile us", lambda r: _us(r["compile_s"])),
    ("vs eager", lambda r: _x(r["ratio_eager"])),
    ("vs compile", lambda r: _x(r["ratio_compile"])),
]

Columns = Sequence[tuple]


def _cells(rows: Sequence[dict], columns: Columns) -> List[List[str]]:
    return [[str(get(r)) for _, get in columns] for r in rows]


def text_table(rows: Sequence[dict], columns: Columns) -> str:
    cells = [[name for name, _ in columns]] + _cells(rows, columns)
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def markdown_table(rows: Sequence[dict], columns: Columns) -> str:
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in _cells(rows, columns)]
    return "\n".join([head, rule, *body])


def _total_rows(arch: dict) -> List[dict]:
    return [{"part": part, **values} for part, values in arch["totals"].items()]


def _config_line(report: dict) -> str:
    c = report["config"]
    layout = "channels_last" if c["channels_last"] else "NCHW"
    return (f"{c['model']}, {c['size'][0]}x{c['size'][1]}, batch {c['batch']}, {c['dtype']}, {layout}, "
            f"{c['mode']}")


def _sections(report: dict, table: Callable[[Sequence[dict], Columns], str], title: Callable[[str], str]) -> List[str]:
    out = []
    for name, arch in report["archs"].items():
        out += [title(f"{name} (sm_{arch['sm']})"), "Kernel variants (summed over their launches):",
                table(arch["variants"], VARIANT_COLUMNS), "",
                "Op calls (per call; 'vs' = eager or compile time / hrfast time, > 1: hrfast predicted faster):",
                table(arch["op_calls"], OP_COLUMNS), "", "Totals over every op call:",
                table(_total_rows(arch), TOTAL_COLUMNS), ""]
        cuda = arch["cuda_cpp"]
        if "skipped" in cuda:
            out += [f"CUDA C++ kernels: skipped ({cuda['skipped']})", ""]
        else:
            out += [f"CUDA C++ fusion kernels ({cuda['note']}):", table(cuda["launches"], CUDA_COLUMNS), "",
                    "Per fusion op call, kernels only:", table(cuda["op_calls"], CUDA_OP_COLUMNS), ""]
    return out


def terminal(report: dict) -> str:
    lines = [report["header"], _config_line(report),
             f"recorded {report['recorded']['launches']} launches, {report['recorded']['variants']} variants, "
             f"{report['recorded']['op_calls']} op calls ({report['recorded']['distinct_op_calls']} distinct)", ""]
    return "\n".join(lines + _sections(report, text_table, lambda t: f"== {t} =="))


def markdown(report: dict) -> str:
    lines = [f"# hrfast inspect: {_config_line(report)}", "", f"**{report['header']}**", "",
             f"Command: `{report.get('command', 'python -m hrfast inspect')}`; versions: "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", "",
             f"Recorded {report['recorded']['launches']} kernel launches ({report['recorded']['variants']} "
             f"distinct variants) in {report['recorded']['op_calls']} fused op calls "
             f"({report['recorded']['distinct_op_calls']} distinct).", "", "## How it is counted", ""]
    lines += [f"- **{key}**: {text}" for key, text in report["method"].items()]
    lines += ["", "Model constants: " + ", ".join(f"{k} = {v}" for k, v in report["constants"].items()
                                                    if k != "archs"), ""]
    lines += _sections(report, markdown_table, lambda t: f"## {t}\n")
    lines += ["## What hrfast runs besides its kernels, per op call (ATen ops: count, MB moved)", ""]
    for row in report["op_calls"]:
        phases = [_aten_summary(phase, ops) for phase, ops in row["hrfast_aten_ops"].items() if ops]
        if phases:
            lines.append(f"- {row['op']}: " + "; ".join(phases))
    lines.append("")
    lines += ["## Notes per kernel variant", ""]
    for name, arch in report["archs"].items():
        for row in arch["variants"]:
            notes = ([row["launch_failure"]] if row["launch_failure"] else []) + row["notes"]
            if notes:
                lines.append(f"- {name}, {row['kernel']} ({row['key']}): " + "; ".join(notes))
    return "\n".join(lines) + "\n"


def _aten_summary(phase: str, ops: Sequence[dict]) -> str:
    names = Counter(op["name"] for op in ops)
    listed = ", ".join(name + (f" x{n}" if n > 1 else "") for name, n in names.most_common())
    return f"{phase} {len(ops)} ops, {_mb(sum(op['bytes'] for op in ops))} MB ({listed})"


def write(report: dict, folder: Path, stem: str) -> List[Path]:
    """<folder>/<stem>.json (every number) and <stem>.md."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(report))
    return paths
