"""`python -m tests.gpu.reproduce_misaligned_parameters unpadded|padded`: why compiled blocks crashed under ZeRO-1/2.

Packs the parameters of a compiled 3-layer 125M-shaped model into one flat bf16 buffer, end to end
(what ZeRO-1/2 do without `zero_optimization.parameter_alignment`) or each padded to 16 bytes (what
`train.engine` asks for), then runs forward + backward once and prints which parameters are off a
16-byte boundary and whether the step ran. On an H100 (docs/bench/trainer_125m_16k_compiled.md):
unpadded, 26 parameters are misaligned and the compiled block fails with `CUDA error: misaligned
address` (the one graph every layer shares assumes the alignment layer 0's parameters had); padded,
the step runs. Run each in its own process: the error leaves the CUDA context unusable.
"""
import sys

import torch
from torch import nn

from model.config import load_model_config
from model.lm import TTTLM
from train.compile import compile_blocks

ALIGNMENT_ELEMENTS = 8  # 16 bytes of bf16


def pack_parameters(model: nn.Module, padded: bool) -> list[str]:
    """Make every parameter a view of one flat buffer, in order; returns the names left off a 16-byte boundary."""
    params = list(model.parameters())
    sizes = [p.numel() + ((-p.numel()) % ALIGNMENT_ELEMENTS if padded else 0) for p in params]
    flat = torch.empty(sum(sizes), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p, size in zip(params, sizes):
        view = flat[offset:offset + p.numel()].view_as(p)
        view.copy_(p.data)
        p.data = view
        offset += size
    return [name for name, p in model.named_parameters() if p.data_ptr() % 16]


def main(padded: bool) -> None:
    torch.manual_seed(0)
    model = TTTLM(load_model_config("configs/model/125m.yaml", ["num_layers=3"])).cuda().bfloat16()
    misaligned = pack_parameters(model, padded)
    print("padded" if padded else "unpadded", "misaligned:", len(misaligned), misaligned[:3], flush=True)
    compile_blocks(model)
    ids = torch.randint(0, 32000, (1, 4097), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids[:, :-1], ids[:, 1:], return_logits=False).loss
    loss.backward()
    torch.cuda.synchronize()
    print("step ran, loss", loss.item(), flush=True)


if __name__ == "__main__":
    main(padded=sys.argv[1] == "padded")
