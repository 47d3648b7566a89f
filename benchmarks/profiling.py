"""What one call of a step is made of, from the profiler: the kernels it launches with their summed device
time, and the operators that take the host's time. Beside a step's wall time these say whether it is
bound by its kernels or by the host queueing them (the decode and training-step benchmarks both ask)."""

from __future__ import annotations

from typing import Callable

import torch

TOP_KERNELS, TOP_KERNEL_NAME = 25, 90  # the kernels a row lists (by their summed time), and the width of a name


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_kernels(step: Callable[[], None], device: torch.device) -> dict:
    """The kernels one call of `step` launches and their summed device time (a decode step run outside
    its CUDA graphs, which replay the same kernels: what a replay pays per kernel shows as their count)."""
    from torch.profiler import ProfilerActivity

    events = profiled(step, device, ProfilerActivity.CUDA).events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return kernel_summary([(e.name, e.time_range.elapsed_us()) for e in kernels])


def profiled(run: Callable[[], object], device: torch.device, activity) -> "torch.profiler.profile":
    """The profiler's record of one call of `run` (device work finished inside it) for `activity`."""
    from torch.profiler import profile

    with profile(activities=[activity]) as prof:
        run()
        synchronize(device)
    return prof


def kernel_summary(kernels: list[tuple[str, float]]) -> dict:
    """(name, microseconds) of each kernel launched -> their count, summed ms, and the names that take
    the most time (with how often each ran): which kernels a step is made of."""
    by_name: dict[str, list[float]] = {}
    for name, us in kernels:
        by_name.setdefault(name[:TOP_KERNEL_NAME], []).append(us)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:TOP_KERNELS]
    return {"kernels": len(kernels), "kernel_ms": sum(us for _, us in kernels) / 1e3,
            "top_kernels": [{"name": name, "count": len(times), "us": round(sum(times), 1)} for name, times in top]}


def host_summary(run: Callable[[], object], device: torch.device) -> dict:
    """Where one call's host time goes: the operators (aten ops, the project's custom ops, compiled
    regions) by their own host time, most first. Beside the kernels' device time this says which
    calls keep the host from queueing ahead."""
    from torch.profiler import ProfilerActivity

    events = sorted(profiled(run, device, ProfilerActivity.CPU).key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"host_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "top_host_ops": [{"name": e.key[:TOP_KERNEL_NAME], "count": e.count, "self_us": round(e.self_cpu_time_total, 1)}
                             for e in events[:TOP_KERNELS]]}  # fmt: skip


def host_ops_clause(summary: dict, top: int = 3) -> str:
    """A `host_summary`'s operators that take the most host time, as a clause of a results line (empty
    without them): where a call's wall time exceeds its kernels', these are what to make cheaper or fewer."""
    ops = summary.get("top_host_ops", [])[:top]
    return "; most host time: " + ", ".join(f"{op['name']} {op['self_us'] / 1e3:.1f} ms ({op['count']}x)" for op in ops) if ops else ""
