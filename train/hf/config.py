"""`TTTLAConfig`: the `transformers` config of a tttla LM, written as config.json beside an export.

It holds `model.config.LMConfig` field by field (the TTT layer's settings as the dict `ttt`), with
`tie_word_embeddings` standing for `tie_embeddings` and the usual names (`num_hidden_layers`,
`num_attention_heads`) mapped onto tttla's. `lm_config()` turns it back into a validated LMConfig,
through the same OmegaConf schema as a model YAML, so a bad value fails naming its key.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers import PretrainedConfig

from model.config import ConfigError, LMConfig

MODEL_TYPE = "tttla"
# LMConfig's fields that the config keeps as attributes of its own name (`ttt` is a dict; `tie_embeddings` is
# transformers' `tie_word_embeddings`).
LM_FIELDS = tuple(f.name for f in fields(LMConfig) if f.name not in ("ttt", "tie_embeddings"))


class TTTLAConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_attn_heads"}

    def __init__(self, ttt: Optional[dict[str, Any]] = None, tie_word_embeddings: bool = True, **kwargs: Any) -> None:
        defaults = LMConfig()
        for name in LM_FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        self.ttt = dict(asdict(defaults.ttt) if ttt is None else ttt)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_lm_config(cls, cfg: LMConfig, **kwargs: Any) -> "TTTLAConfig":
        """The config of a model built from `cfg`; kwargs are transformers' own (`eos_token_id`, ...)."""
        values = asdict(cfg)
        return cls(tie_word_embeddings=values.pop("tie_embeddings"), **values, **kwargs)

    def lm_config(self) -> LMConfig:
        """The validated LMConfig; an unknown key or a wrongly typed or invalid value raises ConfigError naming it."""
        values = {name: getattr(self, name) for name in LM_FIELDS}
        values.update(ttt=self.ttt, tie_embeddings=self.tie_word_embeddings)
        try:
            cfg: LMConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LMConfig), values))
        except OmegaConfBaseException as error:
            raise ConfigError(f"config.json: {error}") from error
        return cfg.validate(prefix="config")

    def to_diff_dict(self) -> dict[str, Any]:
        """Every model field, default or not: a saved config keeps meaning the same model when the
        defaults of LMConfig change."""
        fields_kept = {name: getattr(self, name) for name in LM_FIELDS}
        return {**super().to_diff_dict(), **fields_kept, "ttt": self.ttt, "tie_word_embeddings": self.tie_word_embeddings}
