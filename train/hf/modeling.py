"""`TTTLAForCausalLM`: a tttla LM as a `transformers` causal LM, and `TTTLACache`, its decoding state.

The class wraps `model.lm.TTTLM` unchanged (its weights sit under `model.`, and an export's
model.safetensors, written without that prefix, loads as a base model's checkpoint does). It runs
the project's own computations and adds none:

* without a cache (training, scoring) the forward is the chunk form, `TTTLM.forward`; padding
  (`attention_mask` zeros, on either side) makes the padded tokens documents of their own, so every
  real token is computed as in its unpadded row (`doc_ids`: the state and the positions restart);
* with a cache (`use_cache=True`, as `generate()` passes it, or a `TTTLACache`) the first call
  prefills each row's unpadded prompt in the chunk form and later calls step token by token:
  `decoding.static` (fast weights, the partial chunk's running sums and the window ring, per
  row at its own position; nothing grows with the context).

A TTT state cannot be cut back to an earlier position, so the model is stateful for `generate()`
(`_is_stateful`): assisted decoding is refused by transformers; beam search reorders rows.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from decoding.static import StaticDecoder, prefill_prompts
from model.lm import Block, TTTLM
from model.loss import IGNORE_INDEX
from train.hf.config import TTTLAConfig


class TTTLACache(Cache):
    """The constant-size decoding state of a batch (`decoding.static.StaticDecoder`: per layer the
    fast weights, the partial chunk's running gradient and the window's keys and values), empty until
    the first forward fills it. `get_seq_length` counts the columns consumed, padding included, as
    transformers counts a cache's positions; each row's own position lives in the decoder."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.decoder: Optional[StaticDecoder] = None
        self.columns = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    @property
    def is_compileable(self) -> bool:
        return False

    def consume(self, model: TTTLM, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], keep_last: int) -> torch.Tensor:
        """ids [B, n] -> logits [B, n, V] (of the last `keep_last` columns; 0: all). The first call
        prefills (left padding allowed: a row's zeros are left out and its logits there are zero);
        later calls feed one column at a time."""
        if self.decoder is None:
            logits = self._prefill(model, input_ids, attention_mask, keep_last)
        else:
            logits = torch.stack([self.decoder.consume(column) for column in input_ids.unbind(dim=1)], dim=1)
            logits = logits[:, -keep_last:] if keep_last else logits
        self.columns += input_ids.shape[1]
        return logits

    def _prefill(self, model: TTTLM, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], keep_last: int) -> torch.Tensor:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("decoding needs left padding (attention_mask zeros before a row's tokens): set the tokenizer's padding_side='left'")
        prompts = [ids[row_mask].tolist() for ids, row_mask in zip(input_ids, mask)]
        per_row, self.decoder = prefill_prompts(model, prompts, keep_last or None)
        kept = keep_last or input_ids.shape[1]
        logits = per_row[0].new_zeros(len(prompts), kept, per_row[0].shape[-1])
        for row, row_logits in enumerate(per_row):
            logits[row, kept - row_logits.shape[0] :] = row_logits[-kept:]
        return logits

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.decoder = self.decoder.select(beam_idx.to(self.decoder.positions.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(self.decoder.positions.shape[0]).repeat_interleave(repeats)
        self.reorder_cache(rows)

    def crop(self, max_length: int) -> None:
        raise ValueError("a TTT decoding state cannot be cut back to an earlier position (its fast weights have absorbed the tokens)")

    def reset(self) -> None:
        self.decoder, self.columns = None, 0


class TTTLAForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TTTLAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = [Block.__name__]
    _is_stateful = True

    def __init__(self, config: TTTLAConfig) -> None:
        super().__init__(config)
        self.model = TTTLM(config.lm_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only where transformers asks (a fresh model, a missing weight): the LM's own initialisation."""
        if isinstance(module, TTTLM):
            module.reset_parameters()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> Optional[torch.nn.Module]:
        return self.model.head  # None when tied: the head reads the embedding

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[TTTLACache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T, V] (the last `logits_to_keep`; 0: all) and, with `labels`
        [B, T] (HF convention: the token itself, shifted here; -100 ignored), the mean loss. With a
        cache or `use_cache=True` (and no labels) the call decodes and returns the cache."""
        if past_key_values is not None or (use_cache and labels is None):
            cache = TTTLACache() if past_key_values is None else past_key_values
            return CausalLMOutputWithPast(logits=cache.consume(self.model, input_ids, attention_mask, logits_to_keep), past_key_values=cache)
        doc_ids = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.long()
        targets = None if labels is None else torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        output = self.model(input_ids, targets, doc_ids=doc_ids)
        logits = output.logits[:, -logits_to_keep:] if logits_to_keep else output.logits
        return CausalLMOutputWithPast(loss=output.loss, logits=logits)
