"""Record the Triton launches the launchers make, without running them (no GPU, no interpreter).

Inside `with record() as launches:` every `@triton.jit` function found as a module attribute under
`hrfast.kernels` is replaced by a recorder, so `kernel[grid](*args, **kwargs)` appends a `Launch` instead of
compiling and running. The launchers can then run on `device="meta"` tensors. Compile the recorded launches
after the block: while it is active the kernels' globals name recorders, not kernels. A kernel imported by name
into a module outside the recorded packages is not replaced there.

`Launch.specialization()` reproduces what Triton's JIT passes to the compiler for the same call on a GPU
(triton/runtime/jit.py `create_function_from_signature` and `JITFunction._pack_args`, with the per-argument
rule of `native_specialize_impl`, python/src/specialize.cc, and `BaseBackend.get_*_specialization`,
triton/backends/compiler.py; the same in Triton 3.6 and 3.8):
- an int equal to 1 becomes the constant 1 (unless the parameter is in `do_not_specialize`);
- ints are i32 when they fit in int32, else i64 (u64 above int64); bools are u1, floats fp32, None a constant;
- ints divisible by 16 and tensors whose address is divisible by 16 carry `tt.divisibility=16` (unless in
  `do_not_specialize_on_alignment`). A tensor's address is taken as its storage offset in bytes: allocations are
  256-byte aligned on a GPU, and meta tensors have no address;
- tuples are specialised element by element with the default rules, whatever the parameter's flags;
- parameters annotated `tl.constexpr` are constants; a runtime parameter annotated with a type takes that type
  (its value still specialised, except for float and bool annotations).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

INT32 = (-2**31, 2**31 - 1)
INT64 = (-2**63, 2**63 - 1)
DIVISIBILITY = 16
LAUNCH_OPTION_DEFAULTS = {"num_warps": 4, "num_stages": 3}  # triton's CUDAOptions defaults
TORCH_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                    torch.uint8: "u8", torch.bool: "i1"}


@dataclass(frozen=True)
class Specialization:
    """What `ASTSource(fn, signature, constexprs, attrs)` takes: types by parameter name (a tuple parameter's
    type is a tuple of types), constant values and `tt.divisibility` attributes by argument path."""

    signature: Dict[str, Any]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], list]


@dataclass
class Launch:
    """One recorded `fn[grid](*args, **kwargs)`: the kernel, its resolved grid, and the call as made."""

    fn: Any  # the triton.JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: Tuple[int, ...]
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def params(self) -> Dict[str, Any]:
        """Every kernel parameter by name, defaults applied."""
        return bind(self.fn, self.args, self.kwargs)

    @property
    def options(self) -> Dict[str, Any]:
        """The launch options (num_warps, num_stages, ...): the keyword arguments that are no parameters."""
        names = set(_signature(self.fn).parameters)
        return {**LAUNCH_OPTION_DEFAULTS, **{k: v for k, v in self.kwargs.items() if k not in names}}

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def warps(self) -> int:
        """Warps the whole grid launches."""
        return self.programs * self.options["num_warps"]

    def specialization(self) -> Specialization:
        return specialize_call(self.fn, self.params)

    def variant_key(self) -> tuple:
        """Equal for launches that compile to the same binary."""
        spec = self.specialization()
        return (self.fn, repr(spec.signature), repr(sorted(spec.constexprs.items())), repr(sorted(spec.attrs)),
                repr(sorted(self.options.items())))


class Recorder:
    """Stands in for a kernel: `recorder[grid](*args, **kwargs)` records a Launch; other attributes are the
    kernel's."""

    def __init__(self, fn, launches: List[Launch]):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid) -> Callable:
        def launch(*args, **kwargs):
            resolved = grid(bind(self.fn, args, kwargs)) if callable(grid) else grid
            self.launches.append(Launch(self.fn, tuple(resolved), args, kwargs))
        return launch

    def __getattr__(self, name):
        return getattr(self.fn, name)


def is_kernel(obj) -> bool:
    """A @triton.jit function, compiled (JITFunction) or interpreted (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return isinstance(obj, (JITFunction, InterpretedFunction))


def _modules(source: Union[str, ModuleType]) -> Iterator[ModuleType]:
    """The module, and every module of the package under it."""
    module = importlib.import_module(source) if isinstance(source, str) else source
    yield module
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), module.__name__ + "."):
        yield importlib.import_module(info.name)


@contextlib.contextmanager
def record(*sources: Union[str, ModuleType]) -> Iterator[List[Launch]]:
    """Replace the @triton.jit functions of `sources` (modules or packages, default `hrfast.kernels`) by
    recorders for the duration of the block; yields the list the launches are appended to."""
    launches: List[Launch] = []
    replaced = []
    # every module imported before any is patched: one imported later would bind a patched kernel it imports
    # from a patched module (`from .fuse import relu`), and keep the recorder after the block
    modules = [m for source in (sources or ("hrfast.kernels",)) for m in _modules(source)]
    for module in modules:
        for name, value in list(vars(module).items()):
            if is_kernel(value):
                replaced.append((module, name, value))
                setattr(module, name, Recorder(value, launches))
    try:
        yield launches
    finally:
        for module, name, value in replaced:
            setattr(module, name, value)


# ------------------------------------------------------------------------------------------ specialization


def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn.fn)


def bind(fn, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The kernel's parameters by name for this call, defaults applied; launch options left out."""
    sig = _signature(fn)
    params = {k: v for k, v in kwargs.items() if k in sig.parameters}
    bound = sig.bind(*args, **params)
    bound.apply_defaults()
    return dict(bound.arguments)


def _kernel_params(fn) -> list:
    """Triton's own parameter descriptions (constexpr, annotation type, specialisation flags)."""
    from triton.runtime.jit import KernelParam
    if hasattr(fn, "params"):
        return fn.params
    flags = getattr(fn, "kwargs", {})  # an InterpretedFunction keeps the decorator's arguments
    dns, dns_oa = flags.get("do_not_specialize") or [], flags.get("do_not_specialize_on_alignment") or []
    return [KernelParam(i, p, i in dns or p.name in dns, i in dns_oa or p.name in dns_oa)
            for i, p in enumerate(_signature(fn).parameters.values())]


def _int_type(value: int) -> str:
    if INT32[0] <= value <= INT32[1]:
        return "i32"
    if INT64[0] <= value <= INT64[1]:
        return "i64"
    if value < 2**64:
        return "u64"
    raise OverflowError(f"integer argument {value} does not fit in 64 bits")


def _alignment_key(divisible: bool, specialize: bool, align: bool) -> Optional[str]:
    """Triton's specialisation key: "D" for divisible by 16, "" for not, None when not specialised."""
    if not specialize:
        return None
    return "D" if align and divisible else ""


def specialize_arg(value, is_const: bool = False, specialize: bool = True, align: bool = True) -> Tuple[Any, Any]:
    """(type, key) of one runtime argument, as Triton's JIT computes them (see the module docstring)."""
    import triton.language as tl
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        return _int_type(value), _alignment_key(value % DIVISIBILITY == 0, specialize, align)
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        prefix = "*k" if is_const else "*"
        offset_bytes = value.storage_offset() * value.element_size()
        return prefix + TORCH_TYPE_NAMES[value.dtype], _alignment_key(offset_bytes % DIVISIBILITY == 0,
                                                                      specialize, align)
    if isinstance(value, tuple):
        pairs = [specialize_arg(v) for v in value]
        make = (lambda items: type(value)(*items)) if hasattr(value, "_fields") else tuple
        return make(p[0] for p in pairs), make(p[1] for p in pairs)
    if isinstance(value, tl.constexpr) or is_kernel(value):
        return "constexpr", value
    raise TypeError(f"cannot specialise a kernel argument of type {type(value).__name__}: {value!r}")


def _paths(tree, path=()) -> Iterator[Tuple[Tuple[int, ...], Any]]:
    """(path, leaf) of a nested tuple, depth first; a non-tuple is its own leaf at the given path."""
    if isinstance(tree, tuple):
        for i, item in enumerate(tree):
            yield from _paths(item, (*path, i))
    else:
        yield path, tree


def _value_at(values: list, path: Tuple[int, ...]):
    for i in path:
        values = values[i]
    return values


def specialize_call(fn, params: Dict[str, Any]) -> Specialization:
    """The signature, constants and attributes the JIT would compile `fn` with for these parameter values."""
    types, keys = [], []
    for kp in _kernel_params(fn):
        value = params[kp.name]
        if kp.is_constexpr:
            types.append("constexpr")
            keys.append(None)
            continue
        specialize = not kp.do_not_specialize
        ty, key = specialize_arg(value, kp.is_const, specialize, not kp.do_not_specialize_on_alignment)
        if kp.annotation_type:
            no_value_specialization = kp.annotation_type == "u1" or kp.annotation_type[:2] in ("fp", "bf")
            ty, key = kp.annotation_type, (None if no_value_specialization or not specialize else key)
        types.append(ty)
        keys.append(key)
    values = list(params.values())
    constexprs = {path: _value_at(values, path) for path, ty in _paths(tuple(types)) if ty == "constexpr"}
    attrs = {path: [["tt.divisibility", DIVISIBILITY]] for path, key in _paths(tuple(keys)) if key == "D"}
    signature = dict(zip(params, types))
    return Specialization(signature, constexprs, attrs)
