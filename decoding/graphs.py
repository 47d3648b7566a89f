"""The decode loop's step, run eagerly or replayed from CUDA graphs: no Python between its kernels.

A static decoder (`StaticDecoder` for the TTT model, `decoding.kv_cache.StaticKVDecoder` for the
transformer) offers `forward_token()` (consume `tokens`, write `logits`), `apply_chunk_updates()`
(fixed-shape, gated on the device), `chunk_due()` / `advance_host()` (the host's own count of
positions, which decides only *which graph to launch*, never what it computes), `buffers()` and
`compile_steps(backend)` (its steps fused by a compiler, `decoding.compiled`; the graphs then record
the compiled kernels). Every step is one of two graphs:

    token graph:     forward_token(); tokens <- sample(logits)                          (other steps)
    boundary graph:  forward_token(); tokens <- sample(logits); apply_chunk_updates()   (some row completes a chunk,
                                                                                         or fills its pending slots)

Captured once with `torch.cuda.CUDAGraph`; a replay relaunches the recorded kernels on the same
buffers, so every step, the chunk update included, is one launch from the host with no Python
between its kernels. The TTT decoder's update reads only running sums the token steps keep, so the
boundary graph does about one token's work more than the token graph. On CPU (and with
`graphs=False`) the same functions run eagerly: that is the path the CPU tests prove equal to
`decoding/decode.py`.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

WARMUP_STEPS = 3  # eager runs on a side stream before capture: lazy inits and kernel autotuning happen there


def warm_up(run: Callable[[], object]) -> None:
    """`WARMUP_STEPS` calls of `run` on a side stream, the current stream waiting for them: what a graph
    will record is compiled, autotuned and lazily initialised before its capture, which would refuse
    those (a capture records kernels; it must not run one-off work or read back from the device)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            run()
    torch.cuda.current_stream().wait_stream(side)


class StaticStepDecoder(Protocol):
    tokens: torch.Tensor  # [B] int64
    logits: torch.Tensor  # [B, V]

    def forward_token(self) -> None: ...
    def apply_chunk_updates(self) -> None: ...
    def chunk_due(self) -> bool: ...
    def advance_host(self) -> None: ...
    def buffers(self) -> list[torch.Tensor]: ...
    def compile_steps(self, backend: Optional[str]) -> None: ...


class DecodeRunner:
    """Steps a static decoder and samples its next tokens into `decoder.tokens`, eagerly or from CUDA graphs.

    `sample(logits [B, V]) -> tokens [B]` must run on the device without host reads
    (`decoding.sampling.sample_tokens`); a `generator` it draws from is registered with the graphs, so
    replays advance it as eager runs would. `step_backend` compiles the decoder's steps ("inductor"
    on CUDA; the tests use "aot_eager"); the first steps, or the capture's warm-up, compile them.
    """

    def __init__(
        self, decoder: StaticStepDecoder, sample: Callable[[torch.Tensor], torch.Tensor], graphs: bool,
        generator: Optional[torch.Generator] = None, step_backend: Optional[str] = None,
    ) -> None:
        if graphs and not decoder.tokens.is_cuda:
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {decoder.tokens.device}: pass graphs=False")
        self.decoder, self.sample = decoder, sample
        decoder.compile_steps(step_backend)
        self.token_graph: Optional[torch.cuda.CUDAGraph] = None
        self.boundary_graph: Optional[torch.cuda.CUDAGraph] = None
        if graphs:
            self._capture(generator)

    def token_step(self) -> None:
        self.decoder.forward_token()
        self.decoder.tokens.copy_(self.sample(self.decoder.logits))

    def boundary_step(self) -> None:
        """The token step, then the chunk updates of the rows it completed."""
        self.token_step()
        self.decoder.apply_chunk_updates()

    def step(self) -> None:
        """Consume `decoder.tokens`, leave the logits in `decoder.logits` and the sampled next tokens in `decoder.tokens`."""
        due = self.decoder.chunk_due()
        if self.token_graph is None and due:
            self.boundary_step()
        elif self.token_graph is None:
            self.token_step()
        else:
            (self.boundary_graph if due else self.token_graph).replay()
        self.decoder.advance_host()

    def _capture(self, generator: Optional[torch.Generator]) -> None:
        """Warm up on a side stream, capture both graphs into one memory pool, and restore the state
        the warm-up advanced (capture itself records kernels without running them). The graphs share
        the pool safely: neither leaves a tensor of its own alive (every result is copied into the
        decoder's buffers), and a generator registered with both advances by whichever replays."""
        saved = [t.clone() for t in self.decoder.buffers()]
        generator_state = None if generator is None else generator.get_state()
        warm_up(self.boundary_step)
        pool = torch.cuda.graph_pool_handle()
        self.token_graph, self.boundary_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        for graph in (self.token_graph, self.boundary_graph) if generator is not None else ():
            graph.register_generator_state(generator)
        with torch.cuda.graph(self.token_graph, pool=pool):
            self.token_step()
        with torch.cuda.graph(self.boundary_graph, pool=pool):
            self.boundary_step()
        for buffer, value in zip(self.decoder.buffers(), saved):
            buffer.copy_(value)
        if generator is not None:  # the first replay draws what the first eager step would have drawn
            generator.set_state(generator_state)
