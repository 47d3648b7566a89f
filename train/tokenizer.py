"""Offline tokenizers for data preparation: UTF-8 bytes by default, or any local `tokenizer.json`.

The byte tokenizer maps text to its UTF-8 bytes (ids 0..255) and uses byte 0 (NUL) as the
end-of-document token, so its vocabulary is exactly 256: it fits the tiny byte-level model
(`vocab_size: 256`) and every larger vocabulary (32000) unchanged. NUL never occurs in real text;
the few NUL bytes an input might hold are dropped and counted so the EOS id stays unambiguous.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

BYTE_EOS_ID = 0
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


@dataclass
class Encoded:
    ids: np.ndarray  # [N] int32, without the trailing EOS
    dropped: int  # input symbols removed because they collide with the EOS id


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256
    eos_id = BYTE_EOS_ID

    def encode(self, text: str) -> Encoded:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        kept = raw[raw != BYTE_EOS_ID]
        return Encoded(kept.astype(np.int32), int(raw.size - kept.size))


class JsonTokenizer:
    """A Hugging Face `tokenizers` file; EOS is `eos_token` or the first known end token it holds."""

    def __init__(self, path: str | Path, eos_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer

        self.name = str(path)
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"--tokenizer {path} is not a valid tokenizer.json ({error}); pass an intact file or 'bytes'") from error
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        ids = [self._tokenizer.token_to_id(token) for token in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"{path} has none of the end tokens {candidates}; pass --eos-token with one it defines")
        self.eos_id = found[0]

    def encode(self, text: str) -> Encoded:
        ids = np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)
        kept = ids[ids != self.eos_id]
        return Encoded(kept, int(ids.size - kept.size))


Tokenizer = ByteTokenizer | JsonTokenizer


def load_tokenizer(spec: str, eos_token: Optional[str] = None) -> Tokenizer:
    """`bytes` or the path of a tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise FileNotFoundError(errno.ENOENT, "--tokenizer is neither 'bytes' nor an existing tokenizer.json", spec)
    return JsonTokenizer(spec, eos_token)
