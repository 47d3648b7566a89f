"""Inductor options from the command line, for A/B runs of one compiler setting (`--inductor KEY=VALUE`).

A benchmark that is bound by the host launching kernels, not by the kernels, changes with how Inductor
launches them (`cpp_wrapper`: from generated C++; `triton.cudagraphs`: replayed as CUDA graphs); the
training-step and decode benchmarks take the same words and apply them with `torch._inductor.config.patch`.
"""

from __future__ import annotations

import ast


def inductor_options(pairs: list[str]) -> dict:
    """KEY=VALUE words -> Inductor config options (`torch._inductor.config`), values read as Python literals
    (True, 64, 0.5) or else kept as text."""
    options = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options
