"""What the layer is checked against, apart from the runtime: `python -m verification.proof` (the
equivalence table), the recurrent layer unrolled into linear attention (`unrolled.py`) and an
independent golden LaCT mixer (`golden_lact.py`)."""
