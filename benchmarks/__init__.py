"""Benchmarks and profiling, apart from the runtime: the kernels (`kernel_ops.py`), sequence parallelism
(`sequence_parallel.py`), the whole training step (`step.py`, `components.py`, `saved_tensors.py`,
`profile_step.py`), the simplification ladder (`ladder.py`) and decoding (`decode.py`)."""
