"""SASS (`cuobjdump -sass`) as per-kernel instruction lists, loops, and instruction counts by class.

A loop is found by its backward branch: a `BRA` whose target address precedes it; the body runs from the target
to the last branch back to it. Nested loops are reported separately: each loop's `body` holds only its own
instructions (a nested loop's are in that loop), so every instruction is in exactly one loop or in the
straight-line part, and a dynamic count is the sum of each part times how often it runs (`model.py`).
Innermost loops come first. The trailing `BRA` to itself after the last EXIT and the NOP padding are dropped.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

_FUNCTION = re.compile(r"Function\s*:\s*(\S+)")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:(@!?U?P\w+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-fA-F]+)")

# instruction classes by mnemonic (the opcode before its first "."); global loads and stores also by width
_WIDTH_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
_CLASSES = {
    "shared": {"LDS", "STS", "LDSM", "STSM", "ATOMS"},
    "async_copy": {"LDGSTS", "LDGDEPBAR", "UBLKCP", "UTMALDG", "UTMASTG", "UTMAPF"},
    "local": {"LDL", "STL"},  # spills and stack
    "atomic": {"ATOM", "ATOMG", "RED", "REDG"},
    "tensor": {"HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "QGMMA"},
    "fp32": {"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FSWZADD"},
    "fp16": {"HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2", "HSET2"},
    "fp64": {"DFMA", "DADD", "DMUL", "DSETP", "DMNMX"},
    "sfu": {"MUFU"},
    "convert": {"F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "I2I", "FRND"},
    "integer": {"IMAD", "IADD3", "IADD", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IMNMX", "VIADD",
                "VIMNMX", "VIADDMNMX", "IABS", "SEL", "PRMT", "MOV", "MOV32I", "IMUL", "POPC", "FLO", "BREV",
                "BMSK", "SGXT", "IDP", "IDP4A", "S2R", "S2UR", "CS2R"},
    "constant": {"LDC"},
    "warp": {"SHFL", "VOTE", "MATCH", "REDUX"},
    "predicate": {"PLOP3", "P2R", "R2P", "PSETP"},
    "control": {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "YIELD",
                "NOP", "DEPBAR", "MEMBAR", "ERRBAR", "CCTL", "SYNCS", "ARRIVES", "ELECT", "NANOSLEEP", "BPT",
                "ACQBULK", "FENCE", "KILL", "WARPGROUP"},
}
_CLASS_OF = {mnemonic: cls for cls, mnemonics in _CLASSES.items() for mnemonic in mnemonics}


def classify(opcode: str) -> str:
    """The class of one opcode: "LDG.<bits>" / "STG.<bits>" for global loads and stores (also generic LD/ST),
    "LDS" / "STS" / "LDGSTS" / "LDL" / "STL" for those memory ops, else a group: shared, async_copy, atomic,
    tensor, fp32, fp16, fp64, sfu, convert, integer (also address arithmetic and moves), constant (LDC), warp
    (shuffles, votes), uniform (the U* datapath), predicate, control, other."""
    parts = opcode.split(".")
    mnemonic = parts[0]
    if mnemonic in ("LDG", "STG", "LD", "ST"):
        bits = next((_WIDTH_BITS[p] for p in parts[1:] if p in _WIDTH_BITS), 32)
        return f"{'LDG' if mnemonic.startswith('LD') else 'STG'}.{bits}"
    if mnemonic in ("LDS", "STS", "LDGSTS", "LDL", "STL"):
        return mnemonic
    if mnemonic in _CLASS_OF:
        return _CLASS_OF[mnemonic]
    if mnemonic.startswith("U"):
        return "uniform"
    return "other"


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, e.g. "LDG.E.128"
    operands: str
    predicate: str = ""

    @property
    def kind(self) -> str:
        return classify(self.opcode)

    @property
    def branch_target(self) -> Optional[int]:
        if self.opcode.split(".")[0] != "BRA":
            return None
        match = _BRANCH_TARGET.search(self.operands)
        return int(match.group(1), 16) if match else None


def counts(instructions: List[Instruction]) -> Counter:
    """Instructions by class (see `classify`), with "total"."""
    result = Counter(i.kind for i in instructions)
    result["total"] = len(instructions)
    return result


@dataclass
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the last backward branch to start
    depth: int  # 1 for an outermost loop
    body: List[Instruction] = field(default_factory=list)  # own instructions, nested loops excluded

    def contains(self, other: "Loop") -> bool:
        return self is not other and self.start <= other.start and other.end <= self.end

    @property
    def counts(self) -> Counter:
        return counts(self.body)


@dataclass
class Kernel:
    name: str
    instructions: List[Instruction]
    loops: List[Loop]  # innermost first, then by address
    straight: List[Instruction]  # the instructions in no loop

    @property
    def counts(self) -> Counter:
        return counts(self.instructions)


def _drop_padding(instructions: List[Instruction]) -> List[Instruction]:
    """Up to the `BRA` to itself that ends every kernel (after it only NOPs)."""
    for k, inst in enumerate(instructions):
        if inst.branch_target == inst.address:
            return instructions[:k]
    return instructions


def find_loops(instructions: List[Instruction]) -> List[Loop]:
    """The loops of one kernel (backward branches), innermost first, each with its own instructions."""
    ends: Dict[int, int] = {}
    for inst in instructions:
        target = inst.branch_target
        if target is not None and target < inst.address:
            ends[target] = max(ends.get(target, 0), inst.address)
    loops = [Loop(start, end, depth=0) for start, end in ends.items()]
    for loop in loops:
        loop.depth = 1 + sum(other.contains(loop) for other in loops)
    loops.sort(key=lambda loop: (-loop.depth, loop.start))
    for inst in instructions:
        owner = next((loop for loop in loops if loop.start <= inst.address <= loop.end), None)
        if owner is not None:
            owner.body.append(inst)
    return loops


def parse_kernel(name: str, instructions: List[Instruction]) -> Kernel:
    instructions = _drop_padding(instructions)
    loops = find_loops(instructions)
    in_loops = {id(i) for loop in loops for i in loop.body}
    return Kernel(name, instructions, loops, [i for i in instructions if id(i) not in in_loops])


def parse_sass(text: str) -> Dict[str, Kernel]:
    """Every function of a `cuobjdump -sass` listing, by name (mangled for CUDA C++)."""
    listings: Dict[str, List[Instruction]] = {}
    current: Optional[List[Instruction]] = None
    for line in text.splitlines():
        function = _FUNCTION.search(line)
        if function:
            current = listings.setdefault(function.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            address, predicate, opcode, operands = match.groups()
            current.append(Instruction(int(address, 16), opcode, operands.strip(), predicate or ""))
    return {name: parse_kernel(name, instructions) for name, instructions in listings.items()}
