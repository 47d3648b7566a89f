"""A golden LaCT mixer written from the released layer's description, sharing no code with the project.

Everything a `TTTMixer` computes from its input x [B, T, D] is recomputed here in the plainest form:
one (sequence, head) at a time, one chunk at a time, the inner gradient taken by `torch.autograd.grad`
of the inner loss (no hand-derived gradients), momentum, Newton-Schulz and weight norm written out as
formulas. It reads only the mixer's parameters and config, never its methods, and imports nothing
from `kernels/` or `model/` (the config type aside), so a mistake in the project's layer cannot be
repeated here. Meant for float64 on tiny sizes: it is slow on purpose.

What it computes (the released `lact_llm` layer, block-causal, apply-then-update):
  q, k, v = x Wqkv;  TTT q/k = silu(q * s + o) (affine optional), L2-normalised (|.| + eps),
  RoPE over blocks of the attention head dim (optional); TTT v = silu(v)
  per chunk c: o_t = f_W(q_t) for t in c;  then, for each fast weight W_i,
      G_i = d/dW_i sum_{t in c} eta_i,t * (-<f_W(k_t), v_t>)
      M_i = beta_c M_i + G_i (momentum: beta_c = mean of sigmoid gates over c) ;  U_i = NS(M_i) (Muon)
      W_i = W_i - sign * U_i ;  weight norm: W_i = W_i / (|W_i|_row + eps) * |W_i(0)|_row
  y = o_proj( RMSNorm_head(o) [* silu(x Ws + bs)] + window attention(q, k, v) )
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from model.config import LMConfig

NEWTON_SCHULZ = {
    "classic": [(3.4445, -4.7750, 2.0315)] * 5,
    "lact": [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)],
}  # fmt: skip


def orthogonalise(m: torch.Tensor, schedule: str) -> torch.Tensor:
    """Newton-Schulz on one matrix: Frobenius-normalise (+1e-7), iterate on the wide orientation."""
    tall = m.shape[0] > m.shape[1]
    x = m.T if tall else m
    x = x / (torch.sqrt((x * x).sum()) + 1e-7)
    for a, b, c in NEWTON_SCHULZ[schedule]:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, layout: str) -> torch.Tensor:
    """Rotate each head x [B, T, A, Dh]: pair j = (j, j + Dh/2) ("half") or (2j, 2j + 1), angle pos * theta^(-2j/Dh)."""
    dim = x.shape[-1]
    out = x.clone()
    for j in range(dim // 2):
        a, b = (j, j + dim // 2) if layout == "half" else (2 * j, 2 * j + 1)
        angle = positions.to(x.dtype) * theta ** (-2.0 * j / dim)  # [T]
        cos, sin = torch.cos(angle)[None, :, None], torch.sin(angle)[None, :, None]
        out[..., a] = x[..., a] * cos - x[..., b] * sin
        out[..., b] = x[..., a] * sin + x[..., b] * cos
    return out


def window_attention(q, k, v, window: int, positions: torch.Tensor, cfg: LMConfig) -> torch.Tensor:
    """Softmax attention of token t over keys s with 0 <= t - s < window: [B, T, D] x 3 -> [B, T, D]."""
    batch, seq_len, hidden = q.shape
    heads = cfg.num_attn_heads
    q, k, v = (t.reshape(batch, seq_len, heads, hidden // heads) for t in (q, k, v))
    q, k = (rope(t, positions, cfg.rope_theta, cfg.rope_layout) for t in (q, k))
    scores = torch.einsum("bthe,bshe->bhts", q, k) / math.sqrt(hidden // heads)
    distance = positions[:, None] - positions[None, :]
    scores = scores.masked_fill(~((distance >= 0) & (distance < window)), float("-inf"))
    return torch.einsum("bhts,bshe->bthe", scores.softmax(-1), v).reshape(batch, seq_len, hidden)


def fast_function(w: dict, x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """f_W(x) for tokens x [n, d]: W1 (silu(W0 x) * (W2 x)), or W1 x for the identity feature map -> [n, d]."""
    hidden = x.T if feature_map == "identity" else F.silu(w["w0"] @ x.T) * (w["w2"] @ x.T)
    return (w["w1"] @ hidden).T


def initial_feature_weight(mixer, name: str) -> Optional[torch.Tensor]:
    """W0 or W2 at the start, [H, dh, d]: the parameter, or W_left W_right + 0.5 I when low-rank."""
    param = getattr(mixer, name)
    if param is None:
        return None
    if isinstance(param, torch.Tensor):
        return param
    rows, cols = param.w_left.shape[1], param.w_right.shape[2]
    return param.w_left @ param.w_right + 0.5 * torch.eye(rows, cols, dtype=param.w_left.dtype)


def run_sequence_head(inputs: dict, start: dict, cfg: LMConfig) -> tuple[torch.Tensor, dict, dict]:
    """The LaCT loop for one (sequence, head): inputs q, k, v [T, d], eta [3, T], gate [T] (or None).

    Returns the outputs [T, d], the fast weights after every chunk's update, and the momenta."""
    ttt = cfg.ttt
    names = ["w0", "w1", "w2"] if ttt.fast_weights == "all" else ["w1"]
    w = dict(start)
    start_row_norms = {n: torch.sqrt((start[n] ** 2).sum(dim=1, keepdim=True)) for n in names}
    momenta = {n: torch.zeros_like(start[n]) for n in names}
    outputs = []
    seq_len = inputs["q"].shape[0]
    for s in range(0, seq_len, ttt.chunk_size):
        e = min(s + ttt.chunk_size, seq_len)
        outputs.append(fast_function(w, inputs["q"][s:e], ttt.feature_map))  # apply first
        prediction = fast_function(w, inputs["k"][s:e], ttt.feature_map)
        token_losses = -(prediction * inputs["v"][s:e]).sum(dim=1)  # [n]
        new_w = dict(w)
        for n in names:
            eta = inputs["eta"][int(n[1]), s:e]
            (grad,) = torch.autograd.grad((eta * token_losses).sum(), w[n], create_graph=True)
            step = grad
            if ttt.momentum:
                momenta[n] = inputs["gate"][s:e].mean() * momenta[n] + grad
                step = momenta[n]
            if ttt.muon:
                step = orthogonalise(step, ttt.ns_coefficients)
            updated = w[n] - ttt.update_sign * step
            if ttt.weight_norm:
                row_norms = torch.sqrt((updated**2).sum(dim=1, keepdim=True))
                updated = updated / (row_norms + ttt.weight_norm_eps) * start_row_norms[n]
            new_w[n] = updated
        w = new_w
    return torch.cat(outputs), w, momenta


def golden_mixer(mixer, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The mixer's output y [B, T, D] for x [B, T, D] at positions 0..T-1, and its final fast weights
    {"w0", "w1", "w2", "m0", "m1", "m2"} -> [B, H, *, *] (W0/W2 absent for the identity map; m* only
    for the fast weights, with momentum on)."""
    cfg: LMConfig = mixer.cfg
    ttt = cfg.ttt
    batch, seq_len, hidden = x.shape
    heads = ttt.num_heads
    d = hidden // heads
    positions = torch.arange(seq_len)
    q, k, v = (x @ mixer.qkv.weight.T).split(hidden, dim=-1)
    fq, fk = q, k
    if ttt.qk_affine:
        fq = q * mixer.qk_scale[:, 0] + mixer.qk_offset[:, 0]
        fk = k * mixer.qk_scale[:, 1] + mixer.qk_offset[:, 1]
    fq, fk, fv = (F.silu(t).reshape(batch, seq_len, heads, d) for t in (fq, fk, v))
    fq, fk = (t / (torch.sqrt((t**2).sum(-1, keepdim=True)) + ttt.l2_eps) for t in (fq, fk))
    if ttt.rope:
        blocks = (batch, seq_len, cfg.num_attn_heads, hidden // cfg.num_attn_heads)
        fq, fk = (rope(t.reshape(blocks), positions, cfg.rope_theta, cfg.rope_layout).reshape(fq.shape) for t in (fq, fk))
    if ttt.per_token_lr:
        eta = F.softplus(x @ mixer.lr_proj.weight.T + mixer.lr_proj.bias).reshape(batch, seq_len, heads, 3)
    else:
        eta = F.softplus(mixer.lr_bias).reshape(1, 1, heads, 3).expand(batch, seq_len, heads, 3)
    gate = torch.sigmoid(x @ mixer.momentum_proj.weight.T + mixer.momentum_proj.bias) if ttt.momentum else None
    start = {"w1": mixer.w1, "w0": initial_feature_weight(mixer, "w0"), "w2": initial_feature_weight(mixer, "w2")}
    out = torch.zeros(batch, seq_len, heads, d, dtype=x.dtype)
    finals: dict[str, list] = {}
    for b in range(batch):
        for h in range(heads):
            inputs = {"q": fq[b, :, h], "k": fk[b, :, h], "v": fv[b, :, h], "eta": eta[b, :, h].T,
                      "gate": None if gate is None else gate[b, :, h]}  # fmt: skip
            head_start = {n: t[h] for n, t in start.items() if t is not None}
            o, w, momenta = run_sequence_head(inputs, head_start, cfg)
            out[b, :, h] = o
            for n, t in list(w.items()) + ([(f"m{n[1]}", m) for n, m in momenta.items()] if ttt.momentum else []):
                finals.setdefault(n, []).append(t)
    final = {n: torch.stack(ts).reshape(batch, heads, *ts[0].shape) for n, ts in finals.items()}
    normed = out * torch.rsqrt((out**2).mean(-1, keepdim=True) + ttt.output_norm_eps) * mixer.ttt_norm.weight
    if ttt.output_scale:
        normed = normed * F.silu(x @ mixer.ttt_scale_proj.weight.T + mixer.ttt_scale_proj.bias)[..., None]
    mixed = normed.reshape(batch, seq_len, hidden)
    if cfg.window_size > 0:
        mixed = mixed + window_attention(q, k, v, cfg.window_size, positions, cfg)
    return mixed @ mixer.o_proj.weight.T, final


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (inf when actual is not finite)."""
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def compare_with_golden(mixer, x: torch.Tensor, seed: int = 7) -> dict[str, float]:
    """Relative errors of `mixer(x)` against `golden_mixer`: "output", "state <name>" for every final fast
    weight and momentum, "grad <parameter>" for every parameter (of a random linear function of the
    output and the final state, so every path is exercised)."""
    params = dict(mixer.named_parameters())
    y, state = mixer(x)
    y_gold, state_gold = golden_mixer(mixer, x)
    generator = torch.Generator().manual_seed(seed)
    errors = {"output": relative_error(y, y_gold)}
    probe = torch.randn(y.shape, generator=generator, dtype=y.dtype)
    objective, objective_gold = (y * probe).sum(), (y_gold * probe).sum()
    for name, expected in state_gold.items():
        actual = getattr(state, name)
        errors[f"state {name}"] = relative_error(actual, expected)
        probe = torch.randn(expected.shape, generator=generator, dtype=expected.dtype)
        objective, objective_gold = objective + (actual * probe).sum(), objective_gold + (expected * probe).sum()
    grads = torch.autograd.grad(objective, list(params.values()))
    grads_gold = torch.autograd.grad(objective_gold, list(params.values()))
    for name, g, g_gold in zip(params, grads, grads_gold):
        errors[f"grad {name}"] = relative_error(g, g_gold)
    return errors


def perturbed_mixer(mixer, seed: int = 0):
    """The mixer (float64) with every parameter moved off its init and learning rates of order 0.1, so
    that each update term matters at the 1e-3 level or more; fixed seed."""
    mixer = mixer.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        lr = mixer.lr_bias if mixer.lr_proj is None else mixer.lr_proj.bias
        lr.copy_(-1.5 + 0.5 * torch.randn(lr.shape, generator=generator, dtype=lr.dtype))
    return mixer
