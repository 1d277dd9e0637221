"""Count the device kernels an optimizer step would launch, on the CPU.

Run under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors), a Triton-backend step
executes the same Python launchers it runs on a GPU. ``LaunchCounter`` records, in order:

- every Triton kernel launch (``InterpretedFunction.run``), by kernel name;
- every torch op that would be a CUDA kernel on a GPU: ops that compute or write tensor data
  (fills, copies, arithmetic, reductions, ``zeros``) — not views, ``empty``, metadata ops, or
  ``item()`` (a device-to-host copy, which the GPU test's profiler filter drops with the other
  memcpys).

The Triton kernels' bodies are not interpreted (their outputs stay unwritten): which kernels a
step launches is decided on the host from shapes, dtypes and options, never from tensor values,
and interpreting the bodies was ~99 % of a counted step's CPU time. What the kernels compute is
what the other interpreter tests check.

On a GPU, ``torch.tensor(values).to(device)`` is a host-to-device memcpy; a steady-state step
makes none (every table is cached after the first step), so counting the second step of a run
sees the same launches the GPU profiler does.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or describe tensors without writing data (no kernel on a GPU). ``lift_fresh`` and
# ``detach_`` are what ``torch.tensor(values)`` issues: a host tensor (then a memcpy to the GPU).
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "detach_", "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "set_", "resize_", "_reshape_alias",
    "_record_function_enter", "_record_function_enter_new", "_record_function_exit",  # profiler annotations
}
# Custom ops of this package (``muon_kernels::*``, triton_kernels/ops.py) are wrappers, not
# launches: their Python bodies run with the counter active, so what they launch is counted.
_PACKAGE_NAMESPACE = "muon_kernels"


def _op_name(func) -> str:
    return func.overloadpacket.__name__


class _TorchOps(TorchDispatchMode):
    def __init__(self, counter: "LaunchCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == _PACKAGE_NAMESPACE:
            from torch._library.custom_ops import _maybe_get_opdef

            opdef = _maybe_get_opdef(func._name)
            if opdef is not None:
                with self:  # the op's body, seen op by op
                    return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if not func.is_view and _op_name(func) not in _NO_KERNEL:
            self.counter.launches.append(("torch", _op_name(func)))
        return out


class LaunchCounter:
    """``with LaunchCounter() as c: opt.step()``; then ``c.launches`` is [(kind, name), ...] with
    kind "triton" or "torch", in launch order."""

    def __init__(self):
        self.launches: list[tuple[str, str]] = []

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._cls = InterpretedFunction
        self._run = InterpretedFunction.run
        launches = self.launches

        def counted_run(fn_self, *args, **kwargs):  # recorded, not run (the module docstring says why)
            launches.append(("triton", getattr(fn_self.fn, "__name__", "kernel")))

        InterpretedFunction.run = counted_run
        self._mode = _TorchOps(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._cls.run = self._run
        return False

    @property
    def total(self) -> int:
        return len(self.launches)

    def by_name(self) -> Counter:
        return Counter(f"{kind}:{name}" for kind, name in self.launches)
