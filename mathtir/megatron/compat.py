"""Run megatron-core's real TP/PP/DP code paths on a machine without a GPU (tests, CI, login-node smoke runs).

megatron-core hard-codes CUDA in a few places on the paths mathtir uses (docs/cpu-compat.md lists each one
and how it was shown necessary). `activate()` is the one place the layer is applied: mathtir.megatron.parallel
calls it when it sets up the process groups, and on a machine with a GPU it does nothing. On CPU it

* makes `torch.cuda`'s device/RNG/stream helpers mean "the CPU" (they would only raise without CUDA), points
  the model-parallel RNG tracker at the CPU generator and builds the default causal mask on the CPU;
* wraps the megatron-core entry points whose bodies ask for CUDA devices or CUDA tensor types (`ENTRY_POINTS`:
  optimizer construction, `step()` and `sharded_state_dict()`, the pipeline schedules, dist_checkpointing's
  save and load, tied-embedding setup) so that they run inside `_CudaAsCpu`, a TorchFunctionMode mapping
  literal `device="cuda"` / `.cuda()` / `Tensor.type()` checks to the CPU. The mode is entered only there:
  it is thread-local and makes `Tensor.type()` report CUDA types, which nothing else must see;
* installs `fix_torch_adam_checkpoints()`, which makes DistributedOptimizer checkpoints of the torch
  Adam/AdamW fallback (no Apex/TE) resume exactly. That one is not a CPU issue: a GPU job without Apex/TE
  calls it itself (a no-op when Apex/TE is present).

The layer patches private megatron-core internals, so it is pinned to the version it was written and
tested against and refuses to run on another one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

WRITTEN_FOR_MEGATRON_CORE = ("0.16.1",)

_active = False


def activate() -> bool:
    """Install the CPU patches when no GPU is present. Returns True if they are (now) active."""
    global _active
    if torch.cuda.is_available():
        return False
    if _active:
        return True
    _check_megatron_version()
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_causal_mask()
    for module_name, attr in ENTRY_POINTS:
        _run_on_cpu(module_name, attr)
    fix_torch_adam_checkpoints()
    _active = True
    return True


# The megatron-core callables whose bodies request CUDA devices or assert CUDA tensor types on the paths
# mathtir uses, as (module, attribute or Class.method). Methods are wrapped on the class that defines them.
ENTRY_POINTS = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.sharded_state_dict"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.step"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.sharded_state_dict"),
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.step"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer.step"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer.sharded_state_dict"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_with_interleaving"),
    ("megatron.core.dist_checkpointing", "save"),
    ("megatron.core.dist_checkpointing", "load"),
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
)
_inside = threading.local()  # nesting depth of wrapped calls on this thread (a step calls clip_grads, ...)


def _run_on_cpu(module_name: str, attr: str) -> None:
    """Make `module.attr` (a function, or a method of a class of the module) run inside `_CudaAsCpu`."""
    owner = importlib.import_module(module_name)
    *classes, name = attr.split(".")
    for class_name in classes:
        owner = getattr(owner, class_name, None)
    if owner is None or name not in vars(owner):
        raise RuntimeError(f"mathtir.megatron.compat: {module_name}.{attr} does not exist in this version; the "
                           "CPU layer must be updated")
    original = vars(owner)[name]

    @functools.wraps(original)
    def on_cpu(*args, **kwargs):
        depth = getattr(_inside, "depth", 0)
        _inside.depth = depth + 1
        try:
            if depth:
                return original(*args, **kwargs)
            with _CudaAsCpu():
                return original(*args, **kwargs)
        finally:
            _inside.depth = depth

    setattr(owner, name, on_cpu)


def _check_megatron_version() -> None:
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version not in WRITTEN_FOR_MEGATRON_CORE:
        raise RuntimeError(
            f"mathtir.megatron.compat was written for megatron-core {', '.join(WRITTEN_FOR_MEGATRON_CORE)} and patches "
            f"its internals; found megatron-core {version}. CPU runs need the pinned version "
            "(pip install megatron-core==0.16.1); GPU runs do not use this layer."
        )


def _replace(module_name: str, attr: str, replacement) -> None:
    """Swap `module.attr`, failing loudly if megatron-core/torch no longer has it (the patch would be moot)."""
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise RuntimeError(
            f"mathtir.megatron.compat: {module_name}.{attr} does not exist in this version; the CPU layer must be "
            "updated"
        )
    setattr(module, attr, replacement)


class _NoStream:
    """Stands in for torch.cuda.Stream/Event: on CPU every op is already complete when it returns."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    # Megatron passes torch.cuda.current_device() as a `device=` argument; a torch.device is valid there.
    cpu = torch.device("cpu")
    _replace("torch.cuda", "current_device", lambda: cpu)
    _replace("torch.cuda", "synchronize", lambda device=None: None)
    _replace("torch.cuda", "Stream", _NoStream)
    _replace("torch.cuda", "Event", _NoStream)
    _replace("torch.cuda", "current_stream", lambda device=None: _NoStream())
    _replace("torch.cuda", "default_stream", lambda device=None: _NoStream())
    _replace("torch.cuda", "stream", lambda stream=None: contextlib.nullcontext())
    _replace("torch.cuda", "empty_cache", lambda: None)
    # The "CUDA" generator of a CPU process is the CPU generator.
    _replace("torch.cuda", "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _replace("torch.cuda", "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    _replace("torch.cuda", "manual_seed", lambda seed: torch.manual_seed(seed))


def _patch_rng_tracker() -> None:
    # The tracker forks per-rank streams (TP-rank-dependent dropout/init) by saving and restoring the device
    # generator; on CPU that generator is torch's default one. fork() itself stays real.
    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    _replace("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", get_state)
    _replace("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", set_state)

    # fork() warns when the CPU generator moves inside it; on CPU that generator IS the forked one, so the
    # warning is always a false alarm.
    class _DropForkWarning(logging.Filter):
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropForkWarning())


def _patch_causal_mask() -> None:
    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    # fused_softmax imported the function by name, so patch it where it is called.
    _replace("megatron.core.transformer.utils", "get_default_causal_mask", get_default_causal_mask)
    _replace("megatron.core.fusions.fused_softmax", "get_default_causal_mask", get_default_causal_mask)


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaAsCpu(TorchFunctionMode):
    """Maps CUDA device requests to the CPU and makes `Tensor.type()` answer with the CUDA type names
    that megatron's optimizer code asserts on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Called for every torch call inside (thousands per checkpoint save): the common case passes through.
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if kwargs and (_is_cuda(kwargs.get("device")) or "pin_memory" in kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k != "pin_memory"}
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **(kwargs or {}))


_adam_fixed = False


def fix_torch_adam_checkpoints() -> bool:
    """Exact resume for DistributedOptimizer over torch Adam/AdamW (megatron-core's no-Apex/TE fallback).

    Unpatched, 0.16.1 (1) cannot build the loading state dict of a fresh optimizer (its `state_dict()`
    asserts one `step` across an empty state), (2) raises KeyError 'step' when copying loaded per-param
    tensors (the loaded dict has no 'step', the live state has), and (3) after loading gives every param
    the SAME `step` tensor, which torch's foreach AdamW then increments once per param per step: bias
    correction goes wrong and resumed runs drift (~1e-2 in loss). Returns True if the fix is installed.
    """
    global _adam_fixed
    from megatron.core.optimizer import distrib_optimizer

    if _adam_fixed:
        return True
    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return False  # fused Adam keeps `step` in param_groups; none of this applies
    cls = distrib_optimizer.DistributedOptimizer
    for name in ("state_dict", "load_state_dict", "_set_main_param_and_optimizer_states"):
        if not hasattr(cls, name):
            raise RuntimeError(f"mathtir.megatron.compat: DistributedOptimizer.{name} is gone; update the Adam fix")
    original_state_dict = cls.state_dict
    original_load_state_dict = cls.load_state_dict
    original_set_states = cls._set_main_param_and_optimizer_states

    def state_dict(self):
        _allocate_adam_state(self.optimizer)
        return original_state_dict(self)

    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        for param_state in self.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].detach().clone()

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            live_step = self.optimizer.state[main_param].get("step")
            if live_step is not None:
                tensors = {**tensors, "step": live_step}  # step comes from param_groups, set already
        original_set_states(self, model_param, tensors)

    cls.state_dict = state_dict
    cls.load_state_dict = load_state_dict
    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    _adam_fixed = True
    return True


def _allocate_adam_state(optimizer) -> None:
    """Give a never-stepped torch Adam/AdamW the zero state its first step would create (step 0), without
    touching the parameters (a dummy step would apply weight decay)."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if state:
                continue
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
