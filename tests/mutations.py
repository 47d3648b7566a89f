"""`python -m tests.mutations`: break the layer and its decoding kernels on purpose, one way at a time, and check the tests notice.

Each mutation is a text patch applied to a fresh copy of the tracked tree in a temporary folder; the
layer's tests then run in that copy (`pytest -x`), and the first failing test is reported. A
mutation that no test catches is a hole in the suite, and the script exits non-zero. The unpatched
copy runs first and must pass, so a failure below is the mutation's doing.

    python -m tests.mutations            # all mutations
    python -m tests.mutations -k rope    # those whose name contains "rope" (-k again for more)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_golden_reference.py",
    "tests/test_equivalence.py",
    "tests/test_lact_update.py",
    "tests/test_layer.py",
    "tests/test_generate_decode.py",
    "tests/test_decode_static.py",
    "tests/test_document_resets.py",
    "tests/test_token_step.py",
    "tests/test_ring_attention.py",
    "tests/test_window_attention.py",
    "tests/test_memory_budget.py",
    "tests/test_kernels_interpret.py",
    "tests/test_compile.py",
]
LACT, REFERENCE = "kernels/lact.py", "kernels/reference.py"
TOKEN_STEP, RING, WINDOW = "kernels/token_step.py", "kernels/ring_attention.py", "kernels/window_attention.py"
LAYER, LOW_RANK, DECODE, LM = "model/ttt_layer.py", "model/low_rank.py", "decoding/decode.py", "model/lm.py"
CHUNK, TTT_LA, FEATURES = "kernels/chunk.py", "kernels/ttt_la.py", "kernels/features.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    patches: tuple[tuple[str, str, str], ...]  # (file, text to find exactly once, replacement)


GRADS_ALL = "return ChunkGradients(g0=g0, g1=g1, g2=g2)"
APPLY = '        hq = features(q[:, s:e], w.w0, w.w2)\n        outputs.append(torch.einsum("bhde,bnhe->bnhd", w.w1, hq))\n'
AFTER_UPDATE = "        w = apply_chunk_gradients(w, grads, None if beta is None else beta[:, c], step)\n    return torch.cat(outputs, dim=1), w"
MUTATIONS = [
    Mutation("W0 never updated", ((LACT, GRADS_ALL, "return ChunkGradients(g1=g1, g2=g2)"),)),
    Mutation("W1 never updated", ((LACT, GRADS_ALL, "return ChunkGradients(g0=g0, g2=g2)"),)),
    Mutation("W2 never updated", ((LACT, GRADS_ALL, "return ChunkGradients(g0=g0, g1=g1)"),)),
    Mutation("weight norm over the output axis (columns)", (
        (LACT, "return w / (w.norm(dim=-1, keepdim=True) + eps) * row_norm",
         "return w / (w.norm(dim=-2, keepdim=True) + eps) * row_norm"),
        (LACT, "map(lambda x: x.norm(dim=-1, keepdim=True))", "map(lambda x: x.norm(dim=-2, keepdim=True))"),
    )),  # fmt: skip
    Mutation("weight norm without its eps", ((LACT, "(w.norm(dim=-1, keepdim=True) + eps)", "w.norm(dim=-1, keepdim=True)"),)),
    Mutation("W0's step uses eta1 and W1's eta0", (
        (LACT, "eta0[:, s:e], eta1[:, s:e], eta2[:, s:e], w,", "eta1[:, s:e], eta0[:, s:e], eta2[:, s:e], w,"),
    )),  # fmt: skip
    Mutation("W1 and W2 learning rates swapped", (
        (LACT, "eta0[:, s:e], eta1[:, s:e], eta2[:, s:e], w,", "eta0[:, s:e], eta2[:, s:e], eta1[:, s:e], w,"),
    )),  # fmt: skip
    Mutation("learning-rate rows read head-major as weight-major", (
        (LAYER, ".reshape(batch, seq_len, self.num_heads, 3)", ".reshape(batch, seq_len, 3, self.num_heads).transpose(2, 3)"),
    )),  # fmt: skip
    Mutation("TTT q/k L2 norm removed", ((LAYER, "tq, tk = l2_normalise(tq, ttt.l2_eps), l2_normalise(tk, ttt.l2_eps)", "pass"),)),
    Mutation("TTT q/k RoPE removed", ((LAYER, "if ttt.rope:  # the attention", "if False:  # the attention"),)),
    Mutation("decoded tokens placed at position 0", ((DECODE, "token_ids[:, None], state.position)", "token_ids[:, None], 0)"),)),
    Mutation("decoder's chunk update without its momentum decay", ((DECODE, "cache.gate_sum / weights.ttt.chunk_size", "0 * cache.gate_sum"),)),
    Mutation("decoder's running sums never restarted", ((DECODE, "            total.zero_()", "            pass"),)),
    Mutation("classic Newton-Schulz schedule instead of LaCT's", ((LACT, "return NS_SCHEDULES[self.schedule]", 'return NS_SCHEDULES["classic"]'),)),
    Mutation("update before apply", ((LACT, APPLY, ""), (LACT, AFTER_UPDATE, AFTER_UPDATE.replace(
        "\n    return", '\n        outputs.append(torch.einsum("bhde,bnhe->bnhd", w.w1, features(q[:, s:e], w.w0, w.w2)))\n    return')))),
    Mutation("momentum dropped (recurrent)", ((LACT, "new_momentum = beta_c[:, :, None, None] * momentum + grad", "new_momentum = grad"),)),
    Mutation("momentum dropped (parallel)", ((REFERENCE, 'updates = torch.einsum("bhcj,bjhde->bchde", mixing, updates)', "pass"),)),
    Mutation("output scale removed", ((LAYER, "return normed if output_scale is None else normed * output_scale[..., None]", "return normed"),)),
    Mutation("qk offset removed", ((LAYER, "q = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]", "q = q * self.qk_scale[:, 0]"),)),
    Mutation("low-rank W0/W2 without the 0.5 I", ((LOW_RANK, "return self.w_left @ self.w_right + 0.5 * eye", "return self.w_left @ self.w_right"),)),
    Mutation("shared RoPE tables start at position 0", ((
        LM, "positions = torch.arange(position_offset, position_offset + seq_len, device=x.device)",
        "positions = torch.arange(0, seq_len, device=x.device)"),)),
    Mutation("shared RoPE tables ignore packed documents", ((
        LM, "positions = token_positions(position_offset, seq_len, segments)", "positions = token_positions(position_offset, seq_len, None)"),)),
    Mutation("scan kernels: a plain batch's chunks run past their document's end", (
        (CHUNK, "end = tl.minimum(start + chunk_size, (doc + 1) * doc_len)", "end = start + chunk_size"),)),
    Mutation("scan kernels: a plain batch's documents end at a whole chunk", (
        (CHUNK, "doc_end = doc_start + doc_len\n", "doc_end = doc_start + per_doc * chunk_size\n"),)),
    Mutation("read kernel: every program reads the first block of tokens", (
        (TOKEN_STEP, "    first = tl.program_id(0) * BB\n", "    first = tl.program_id(0) * 0\n"),)),
    Mutation("read kernel: each token answered with its block's first h(q)", (
        (TOKEN_STEP, "h = tl.sum(tl.where((token_index == i)[:, None], hq, 0.0), axis=0)",
         "h = tl.sum(tl.where((token_index == 0)[:, None], hq, 0.0), axis=0)"),)),
    Mutation("read kernel: the key features formed from q", (
        (TOKEN_STEP, "ak += tl.dot(xk, w0, input_precision=PRECISION)", "ak += tl.dot(x, w0, input_precision=PRECISION)"),)),
    Mutation("pending slots keep the keys, not their features, where the gradient is a chunk update", (
        ("decoding/pending.py", "    return features(k, *feature_weights).to(k.dtype) if", "    return k if"),)),
    Mutation("pending chunk gradient formed as a chunk update: its sign flipped", (
        ("decoding/pending.py", "    return -chunk_updates(", "    return chunk_updates("),)),
    Mutation("inlined scan: the rows taken as one document", (
        (TTT_LA, "    table = chunk_kernels.regular_chunk_table(rows, hq.shape[0] // rows, chunk_size)\n    return _scan_forward(",
         "    table = chunk_kernels.regular_chunk_table(1, hq.shape[0], chunk_size)\n    return _scan_forward("),)),
    Mutation("inlined feature ops do not list the matmul kernel", (
        (FEATURES, "_FEATURE_KERNELS = (swiglu_projection_kernel, head_matmul_kernel)",
         "_FEATURE_KERNELS = (swiglu_projection_kernel,)"),)),
    Mutation("pending tokens drop the prefill's unfolded tokens", (
        (DECODE, "            pending.write(positions[:, folded:], keys[:, folded:]", "            pass  # ("),)),
    Mutation("pending tokens: the prefill's complete folds dropped", (
        (DECODE, "        if folded:\n            cache.chunk_gradients.add_(", "        if False:\n            cache.chunk_gradients.add_("),)),
    Mutation("the stepwise decoder never folds its pending tokens", (
        (DECODE, "            fold_pending(weights, cache)  # the slots are full", "            pass  # the slots are full"),)),
    Mutation("pending tokens folded for the rows completing a chunk, not those filling their slots", (
        ("decoding/compiled.py", "fold_pending(mixer.scan_weights(), cache, folds)", "fold_pending(mixer.scan_weights(), cache, completes)"),)),
    Mutation("Muon normalises a stack of matrices as one", (
        (LACT, "x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NS_EPS)", "x = x / (x.norm() + NS_EPS)"),)),
    Mutation("decode kernel (W1 only) reads W1 without the token-causal term", (
        (TOKEN_STEP, "            read = read - sign * g1\n", "            read = read\n"),)),
    Mutation("decode kernel (LaCT) takes silu' as the sigmoid", (
        (TOKEN_STEP, "silu_grad = sig_k * (1.0 + a_k * (1.0 - sig_k))", "silu_grad = sig_k"),)),
    Mutation("ring attention skips the newest filled slot", (
        (RING, "slot_ok = (slots < W) & (slots <= last)", "slot_ok = (slots < W) & (slots < last)"),)),
    Mutation("ring attention merges splits without rescaling them", (
        (RING, 'tl.where(m == float("-inf"), 0.0, tl.exp2(m - top))', 'tl.where(m == float("-inf"), 0.0, 1.0)'),)),
    Mutation("window kernel attends one key too far back", (
        (WINDOW, "(distance >= 0) & (distance < WINDOW)", "(distance >= 0) & (distance <= WINDOW)"),)),
    Mutation("window kernel's dK misses the last query that reads a key tile", (
        (WINDOW, "hi = tl.minimum((block + 1) * BN + WINDOW - 1, T)", "hi = tl.minimum((block + 1) * BN + WINDOW - 2, T)"),)),
    Mutation("window kernel skips the mask on tiles crossing the window's far edge", (
        (WINDOW, "| (row0 + BM - 1 - col0 >= WINDOW)", "| (row0 - col0 >= WINDOW)"),)),
    Mutation("window kernel ignores packed documents", (
        (WINDOW, "keep = keep & (row_doc[:, None] == col_doc[None, :])", "keep = keep"),)),
    Mutation("recomputed branch inputs swap q and k", (
        (LAYER, "checkpoint(self.branch_qkv, q, k, v,", "checkpoint(self.branch_qkv, k, q, v,"),)),
    Mutation("ttt.recompute_inputs ignored", (
        (LAYER, "if ttt.recompute_inputs and torch.is_grad_enabled()", "if False and torch.is_grad_enabled()"),)),
]  # fmt: skip


def copy_tree(destination: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the working tree (what git would commit)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def apply(tree: Path, mutation: Mutation) -> None:
    for name, old, new in mutation.patches:
        path = tree / name
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutation {mutation.name!r}: {name} holds {text.count(old)} copies of {old!r}; update the patch")
        path.write_text(text.replace(old, new))


def run_tests(tree: Path) -> tuple[bool, str]:
    """(passed, the first failing test id or the last summary line)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
        cwd=tree, capture_output=True, text=True,
    )  # fmt: skip
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr.strip()[-200:]
    return result.returncode == 0, failed[0] if failed else summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", action="append", default=[],
                        help="run only mutations whose name contains this text (repeat it for several)")
    texts = parser.parse_args().k
    chosen = [m for m in MUTATIONS if not texts or any(text in m.name for text in texts)]
    missed = []
    with tempfile.TemporaryDirectory() as folder:
        baseline = Path(folder) / "baseline"
        copy_tree(baseline)
        passed, summary = run_tests(baseline)
        print(f"unmutated tree: {'passes' if passed else 'FAILS'} ({summary})", flush=True)
        if not passed:
            raise SystemExit("the unmutated tree must pass before mutations mean anything")
        print("| mutation | caught by | seconds |\n|---|---|---|", flush=True)
        for index, mutation in enumerate(chosen):
            tree = Path(folder) / f"mutant{index}"
            shutil.copytree(baseline, tree)
            apply(tree, mutation)
            start = time.time()
            passed, first_failure = run_tests(tree)
            print(f"| {mutation.name} | {'NOT CAUGHT' if passed else first_failure} | {time.time() - start:.0f} |", flush=True)
            if passed:
                missed.append(mutation.name)
            shutil.rmtree(tree)
    if missed:
        raise SystemExit(f"{len(missed)} mutation(s) not caught: {missed}")
    print(f"all {len(chosen)} mutations caught")


if __name__ == "__main__":
    main()
