"""tttla models in `transformers`: importing this package registers `TTTLAConfig` ("tttla") with
`AutoConfig` and `TTTLAForCausalLM` with `AutoModelForCausalLM`, so that

    import train.hf
    model = AutoModelForCausalLM.from_pretrained("runs/x/export")

reads what `python -m train.generation.export` writes. It lives in train/, not model/: the model
stays plain PyTorch, and transformers is a dependency of the tools that read exports.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from train.hf.config import MODEL_TYPE, TTTLAConfig
from train.hf.modeling import TTTLACache, TTTLAForCausalLM

AutoConfig.register(MODEL_TYPE, TTTLAConfig, exist_ok=True)
AutoModelForCausalLM.register(TTTLAConfig, TTTLAForCausalLM, exist_ok=True)

__all__ = ["TTTLACache", "TTTLAConfig", "TTTLAForCausalLM"]
