"""Benchmarks and profiling of the whole model: training-step throughput and memory, decoding, one profiled step."""
