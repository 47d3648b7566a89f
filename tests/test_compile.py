"""torch.compile over the model: blocks are one graph, compiled results equal eager, decoding unchanged.

The compiled runs use the "aot_eager" backend: Dynamo and AOT autograd trace forward and backward
exactly as for Inductor, but the traced ATen ops run eagerly, so a compiled block computes the same
operations as eager and agrees to fp32 rounding of reordered sums (1e-5 relative, far below what a
dropped or duplicated term would change). Inductor's own numerics are checked on the GPU
(tests/gpu/test_compile_gpu.py). The Triton-kernel path runs on CPU in Triton's interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

from model.config import ConfigError, LMConfig, TTTConfig
from model.lm import Block, TTTLM
from parallel.activation_checkpointing import checkpoint_blocks
from tests.op_cases import INLINE_CASES, SCAN_VARIANTS, op_cases
from train.compile import compile_blocks, compile_enabled
from train.config import RunConfig
from train.generation.generate import generate_batch

REL_TOL = 1e-5
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")  # fmt: skip


def config() -> LMConfig:
    """Momentum, token-causal chunks and the window: every branch of the mixer is in the graph.
    Head dims d = dh = 32 are accepted by the Triton kernels."""
    ttt = TTTConfig(num_heads=2, chunk_size=16, momentum=True, token_causal=True, base_lr=0.3)
    return LMConfig(vocab_size=64, hidden_size=64, num_layers=2, num_attn_heads=2, window_size=16, ttt=ttt)


def make_block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    block = Block(config())
    with torch.no_grad():  # learning-rate and momentum heads away from their flat init
        block.mixer.lr_proj.weight.normal_(std=0.3)
        block.mixer.momentum_proj.weight.normal_(std=0.5)
    return block


def run(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Output, input gradient and every parameter gradient of one forward + backward (T = 40: a short last chunk)."""
    x = x.clone().requires_grad_()
    out, state = block(x, None, 0)
    ((out * torch.linspace(-1, 1, out.shape[-1])).sum() + state.w1.square().sum()).backward()
    return out.detach(), x.grad, [p.grad for p in block.parameters()]


def assert_same(expected, actual) -> None:
    for name, e, a in zip(("output", "input gradient"), expected[:2], actual[:2]):
        torch.testing.assert_close(a, e, rtol=REL_TOL, atol=REL_TOL * e.abs().max().item(), msg=name)
    for i, (e, a) in enumerate(zip(expected[2], actual[2])):
        torch.testing.assert_close(a, e, rtol=REL_TOL, atol=REL_TOL * e.abs().max().item(), msg=f"parameter {i}")


@pytest.mark.parametrize("checkpointed", [False, True])
def test_block_compiles_as_one_graph_on_the_reference_path(checkpointed):
    """fullgraph=True: any graph break raises. With activation checkpointing applied first, as the
    trainer does, the compiled call traces through the checkpoint."""
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(1))
    expected = run(make_block(), x)
    block = make_block()
    if checkpointed:
        checkpoint_blocks(block)
    assert compile_blocks(block, fullgraph=True, backend="aot_eager") == 1
    assert_same(expected, run(block, x))


def traced_code(graph: torch.fx.GraphModule) -> str:
    """The code of a traced graph and of the subgraphs it calls (an autograd function's forward and
    backward are subgraphs of the one graph, not breaks)."""
    return "\n".join(module.code for module in graph.modules() if isinstance(module, torch.fx.GraphModule))


@interpreted
@pytest.mark.parametrize("recompute_features", [True, False], ids=["recompute_features", "two_ops"])
def test_block_with_the_kernel_ops_is_one_graph(monkeypatch, recompute_features):
    """The Triton feature and scan kernels as tttla:: ops: no graph break, the ops in the graph, and
    compiled results equal to the eager kernel path, with the features recomputed in the scan's
    backward (`kernels.feature_scan`, the default) and as two ops. The model takes the kernel path on
    CUDA only, so it is forced here (the kernels run in the interpreter)."""
    monkeypatch.setenv("TTTLA_KERNELS", "triton")
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(2))
    block = make_block()
    block.mixer.cfg.ttt.recompute_features = recompute_features
    expected = run(block, x)
    explanation = torch._dynamo.explain(block)(x, None, 0)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    graph_code = traced_code(explanation.graphs[0])
    assert "tttla.chunk_scan" in graph_code and "tttla.swiglu_features" in graph_code
    assert ("autograd_function_apply" in graph_code) == recompute_features
    block.zero_grad()
    compile_blocks(block, fullgraph=True, backend="aot_eager")
    assert_same(expected, run(block, x))


def test_rotary_tables_enter_the_block_from_the_lm():
    """A compiled block given the LM's shared RoPE tables traces neither a tables op nor cos/sin of its
    own (traced as plain ops, Inductor evaluated them inside every element of the rotated q and k); one
    called alone computes them once per rotation as the opaque `tttla::rotary_tables` op (the attention
    heads and the TTT q/k)."""
    from model.layers import shared_rotary_tables

    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(4))
    block = make_block()
    rope = shared_rotary_tables(torch.arange(40), 64 // block.mixer.cfg.num_attn_heads, block.mixer.cfg.rope_theta, x.dtype)
    for tables, op_calls in ((rope, 0), (None, 2)):
        explanation = torch._dynamo.explain(block)(x, None, 0, None, None, tables)
        graph_code = traced_code(explanation.graphs[0])  # with ttt.recompute_inputs the TTT q/k's are in a subgraph
        assert graph_code.count("tttla.rotary_tables") == op_calls, graph_code
        assert ".cos(" not in graph_code and ".sin(" not in graph_code and "torch.cos" not in graph_code


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_tables_op_passes_opcheck(dtype):
    from model.layers import _rotary_tables

    results = torch.library.opcheck(_rotary_tables, (torch.arange(5, 45), 32, 10000.0, dtype))
    assert all(result == "SUCCESS" for result in results.values()), results


OP_CASES = ("swiglu_features", "swiglu_features_recompute", "swiglu_features_backward", "chunk_updates",
            "w1_token_read", "w1_token_read_keys",
            "swiglu_features_backward_recompute_x_only", *(f"chunk_scan{kind}_{variant}" for kind in ("", "_backward")
                                                           for variant in SCAN_VARIANTS))  # fmt: skip


@pytest.fixture(scope="module")
def cpu_op_cases() -> dict:
    return op_cases("cpu", torch.float32)


@interpreted
@pytest.mark.parametrize("case", OP_CASES)
def test_custom_op_passes_opcheck(cpu_op_cases, case):
    """Schema, fake (meta) implementation against the real outputs' shapes, dtypes and strides,
    autograd registration, and tracing through AOT autograd with dynamic shapes."""
    op, args = cpu_op_cases[case]
    results = torch.library.opcheck(op, args)
    assert all(result == "SUCCESS" for result in results.values()), results


def opaque_twin(case: str) -> str:
    """The opaque op's case an inlined op's case mirrors (`tests.op_cases.add_inline_cases`)."""
    return case.replace("_inline", "").replace("_rows", "")


def fresh(args: tuple) -> list:
    """The case's arguments as new leaves (the cases share their tensors)."""
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


@interpreted
@pytest.mark.parametrize("case", INLINE_CASES)
def test_inlined_op_equals_its_opaque_twin(cpu_op_cases, case):
    """The inlined registration (`kernels.triton_utils.inline_op`) runs the same kernels as the opaque
    op: every output bit for bit and, for the forward ops, every input's gradient through the autograd
    formula both registrations share. (Its compiled form, where Inductor launches the kernels, runs on
    the GPU: tests/gpu/test_compile_gpu.py.)"""
    op, args = cpu_op_cases[case]
    twin, twin_args = cpu_op_cases[opaque_twin(case)]
    inline_args, opaque_args = fresh(args), fresh(twin_args)
    inline_out, opaque_out = op(*inline_args), twin(*opaque_args)
    for got, expected in zip(inline_out, opaque_out, strict=True):
        assert torch.equal(got, expected)
    if "backward" in case:
        return
    cotangents = [torch.randn_like(out) for out in opaque_out]
    for outputs, inputs in ((inline_out, inline_args), (opaque_out, opaque_args)):
        sum((out * cotangent).sum() for out, cotangent in zip(outputs, cotangents) if out.numel()).backward()
    tensors = lambda xs: [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]  # noqa: E731
    for got, expected in zip(tensors(inline_args), tensors(opaque_args), strict=True):
        assert torch.equal(got.grad, expected.grad)


@interpreted
@pytest.mark.parametrize("case", INLINE_CASES)
def test_inlined_op_lists_every_kernel_it_launches(cpu_op_cases, monkeypatch, case):
    """torch keys its compiled-graph cache on the source of an inlined op's kernels, which the op lists
    itself (`inline_op`): a kernel launched but not listed would leave a stale compiled graph after
    an edit. Every launch inside the op goes through `launcher`, recorded here."""
    import kernels.chunk
    import kernels.features

    launched = set()

    def recording(kernel):
        launched.add(kernel)
        return kernel

    for module in (kernels.chunk, kernels.features):
        monkeypatch.setattr(module, "launcher", recording)
    op, args = cpu_op_cases[case]
    op(*fresh(args))
    listed = set(torch._library.triton.get_triton_kernels_for_op(op._qualname))
    assert launched and launched <= listed, (launched, listed)


def test_inlined_ops_are_taken_by_default_on_cuda_at_concrete_shapes(monkeypatch):
    """`inline_kernels` decides for every public op: CUDA tensors only (interpreted kernels cannot be
    traced), by default and with TTTLA_INLINE_KERNELS=1 but not =0, and never at symbolic sizes (a
    recompile with dynamic shapes keeps the opaque ops, whose bodies do not pick tiles from sizes in Python)."""
    from types import SimpleNamespace

    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from kernels.triton_utils import inline_kernels

    cuda_like = SimpleNamespace(is_cuda=True, shape=(40, 2, 32))
    symbolic = SimpleNamespace(is_cuda=True, shape=(ShapeEnv().create_unbacked_symint(), 2, 32))
    monkeypatch.delenv("TTTLA_INLINE_KERNELS", raising=False)
    assert inline_kernels(cuda_like)
    monkeypatch.setenv("TTTLA_INLINE_KERNELS", "1")
    assert inline_kernels(cuda_like) and inline_kernels(cuda_like, cuda_like)
    assert not inline_kernels(torch.zeros(3)) and not inline_kernels(cuda_like, symbolic)
    monkeypatch.setenv("TTTLA_INLINE_KERNELS", "0")
    assert not inline_kernels(cuda_like)


def test_each_op_object_is_the_live_registration():
    """Re-importing a kernel module re-registers its ops and frees the old registrations, so an op
    object kept from before (as tests/op_cases.py keeps them) then calls freed memory. Every op the
    suite holds must still be the one the dispatcher knows."""
    from torch._library.custom_ops import OPDEFS

    import tests.op_cases as held

    held_ops = (held.swiglu_features_op, held.swiglu_features_backward_op, held.chunk_scan_op,
                held.chunk_scan_backward_op, held.swiglu_features_inline_op, held.swiglu_features_backward_inline_op,
                held.chunk_scan_rows_op, held.chunk_scan_rows_backward_op)
    for op in held_ops:
        assert OPDEFS[op._qualname] is op, f"{op._qualname} was registered again after it was imported"


def test_whole_lm_traces_as_one_graph():
    """Embedding, every block, the head and the loss: one graph (the trainer compiles per block)."""
    model = TTTLM(config())
    tokens = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(3))
    explanation = torch._dynamo.explain(model)(tokens[:, :-1], tokens[:, 1:])
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_generation_is_unchanged_by_compiled_blocks():
    """Decoding calls each block's own forward, not the compiled call, and must give the same tokens; the
    compiled forward over the generated text predicts each generated token (greedy), so the two
    paths agree with each other."""
    def model() -> TTTLM:
        torch.manual_seed(0)
        return TTTLM(config()).double().eval()

    prompts = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(4))
    expected = generate_batch(model(), prompts, max_new_tokens=20)
    compiled = model()
    compile_blocks(compiled, backend="aot_eager")
    generated = generate_batch(compiled, prompts, max_new_tokens=20)
    assert generated == expected
    with torch.no_grad():
        logits = compiled(torch.cat([prompts, torch.tensor(generated)[:, :-1]], dim=1)).logits
    assert logits[:, prompts.shape[1] - 1 :].argmax(-1).tolist() == generated


def test_compile_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (compile_enabled("auto", cpu), compile_enabled("auto", cuda)) == (False, True)
    assert compile_enabled("True", cpu) and not compile_enabled("false", cuda)  # YAML booleans arrive as 'True'
    assert not compile_enabled("auto", cuda, activation_checkpointing=True) and compile_enabled("true", cuda, True)
    cfg = RunConfig()
    cfg.train.compile = "yes"
    with pytest.raises(ConfigError, match="train.compile='yes' must be one of"):
        cfg.validate()
