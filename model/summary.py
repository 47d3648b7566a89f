"""`python -m model.summary configs/model/125m.yaml [key=value ...]`: parameter counts of a model config.

Builds the model on the meta device, so even the 1.3B config is counted instantly without memory.
"""

from __future__ import annotations

import sys

import torch

from model.config import load_model_config
from model.lm import TTTLM, count_parameters


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m model.summary CONFIG.yaml [key=value ...]")
    cfg = load_model_config(argv[0], argv[1:])
    with torch.device("meta"):
        model = TTTLM(cfg)
    total = count_parameters(model)
    without = count_parameters(model, include_embeddings=False)
    print(f"{argv[0]}: {total / 1e6:.1f}M parameters ({total:,}; {without / 1e6:.1f}M without embeddings)")


if __name__ == "__main__":
    main(sys.argv[1:])
