"""Token-by-token decoding of a `model.lm.TTTLM` (and of the transformer baseline's step runner) on a
state whose size does not grow with the context; `decode.py` defines the semantics."""
