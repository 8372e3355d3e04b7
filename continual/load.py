"""Load a checkpoint so that it fits the machine: in its dtype when that fits the memory at hand (GPUs with
device_map "auto", else half of the free RAM), else NF4 4-bit exactly as training loads its base
(continual.model.load_base_4bit), else an error; never a whole full-precision model that does not fit.

The eval stage (workflows/evaluate.py), the report's samples (analysis/sample.py) and its load check
(analysis/report.py) use it; the sizes come from the safetensors headers, before any tensor is read.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import GraftError

LOADS = ("auto", "full", "nf4")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_SHARE = 0.5     # a model loaded on CPU may take at most this share of the available RAM
GPU_SHARE = 0.9     # ... on GPUs, this share of their free memory (the rest: activations, CUDA context)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 per 256 absmax



def checkpoint_params(folder: str | Path) -> dict[str, int]:
    """Parameters of a safetensors checkpoint read from its headers (no tensor data is read): `total`,
    and `quantized`, those NF4 loading puts in 4-bit (2-D Linear weights except routers, gates and lm_head)."""
    from common.checkpoint import open_checkpoint
    from continual.arch import skip_modules

    ckpt = open_checkpoint(folder)
    shapes = {k: tuple(i.shape) for h in ckpt.headers.values() for k, i in h.tensors.items()}
    skip = skip_modules(ckpt.config, shapes)
    total = quantized = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        total += n
        parts = name.split(".")
        if (len(shape) == 2 and name.endswith(".weight") and "embed_tokens" not in parts
                and not any(s in parts for s in skip)):
            quantized += n
    return {"total": total, "quantized": quantized}


def available_ram() -> int:
    """Bytes of RAM this process can still use: MemAvailable, capped by a cgroup (v2) memory limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, avail)


def free_gpu_memory() -> list[int]:
    """Free bytes per visible GPU (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


@dataclass
class LoadPlan:
    """How one checkpoint is loaded: `mode` full (`dtype` weights) or nf4, where, and the figures behind it."""

    folder: str
    mode: str                 # "full" | "nf4"
    dtype: str                # weights (full) or compute dtype (nf4)
    device: str               # "cuda" | "cpu"
    device_map: str | None
    params: int
    need: dict[str, int]      # estimated bytes per mode: {"full": ..., "nf4": ...}
    budget: int               # bytes the rule allows
    rule: str                 # the rule, in words, with the figures

    def describe(self) -> str:
        what = f"NF4 4-bit (compute {self.dtype})" if self.mode == "nf4" else self.dtype
        return f"{what} on {self.device}" + (f", device_map {self.device_map}" if self.device_map else "")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_load_settings(load: str, dtype: str, key: str = "load") -> None:
    if load not in LOADS:
        raise GraftError(f"{key} = {load!r}. Fix: use one of {', '.join(LOADS)}")
    if dtype not in DTYPES:
        raise GraftError(f"dtype = {dtype!r}. Fix: use one of {', '.join(DTYPES)}")


def plan_load(folder: str | Path, load: str = "auto", dtype: str = "auto", device_map: str = "",
              key: str = "load", fix: str = "") -> LoadPlan:
    """Decide how to load `folder` so that it fits this machine (see the module docstring).

    `auto`: `full` when the model in `dtype` fits the budget (GPUs: 90% of their free memory, spread
    with device_map "auto"; no GPU: half of the available RAM), else `nf4` when that fits, else a
    GraftError naming the folder, the sizes and the fix (`fix`, else forcing `key`). `full`/`nf4` force a mode
    (no size check).
    """
    check_load_settings(load, dtype, key)
    gpus = free_gpu_memory()
    device = "cuda" if gpus else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if gpus else "float32"
    n = checkpoint_params(folder)
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    need = {"full": n["total"] * width,
            "nf4": round(n["quantized"] * NF4_BYTES_PER_PARAM + (n["total"] - n["quantized"]) * width)}
    if gpus:
        budget = int(GPU_SHARE * sum(gpus))
        rule = (f"{GPU_SHARE:.0%} of the free memory of {len(gpus)} GPU(s), {_gb(budget)}, against "
                f"~{_gb(need['full'])} in {dtype} or ~{_gb(need['nf4'])} in NF4")
    else:
        ram = available_ram()
        budget = int(CPU_SHARE * ram)
        rule = (f"no GPU: at most {CPU_SHARE:.0%} of the available RAM ({_gb(ram)}), {_gb(budget)}, against "
                f"~{_gb(need['full'])} in {dtype} or ~{_gb(need['nf4'])} in NF4")
    if load == "auto":
        fits = [m for m in ("full", "nf4") if need[m] <= budget]
        if not fits:
            fix = fix or (f"run this stage where it fits (a GPU node), or force `{key} = \"nf4\"` or "
                          f"`{key} = \"full\"` in its config to try anyway")
            raise GraftError(f"{folder}: the model ({_count(n['total'])} parameters) does not fit this machine "
                             f"({rule}). Fix: {fix}")
        load = fits[0]
    dm = device_map or ("auto" if gpus else None)
    return LoadPlan(str(folder), load, dtype, device, dm, n["total"], need, budget, rule)


def load_model(plan: LoadPlan):
    """Load the checkpoint as `plan` says (NF4 through continual.model.load_base_4bit, as training does)."""
    from transformers import AutoModelForCausalLM

    from continual import model as M

    dtype = M.torch_dtype(plan.dtype)
    if plan.mode == "nf4":
        return M.load_base_4bit(plan.folder, dtype, device_map=plan.device_map or None)
    kw = {"device_map": plan.device_map} if plan.device_map else {}
    model = AutoModelForCausalLM.from_pretrained(plan.folder, dtype=dtype, low_cpu_mem_usage=True, **kw)
    if not plan.device_map and plan.device == "cuda":
        model.to("cuda")
    return model
