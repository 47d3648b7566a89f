"""Offline tokenizers: UTF-8 bytes by default, or any local `tokenizer.json`.

The byte tokenizer maps text to its UTF-8 bytes (ids 0..255) and uses byte 0 (NUL) as the
end-of-document token, so its vocabulary is exactly 256: it fits the tiny byte-level model
(`vocab_size: 256`) and every larger vocabulary (32000) unchanged. NUL never occurs in real text;
the few NUL bytes an input might hold are dropped and counted so the EOS id stays unambiguous.

Data preparation tokenises with them; a prepared dataset keeps a copy of its tokenizer.json
(`TOKENIZER_FILE`) and an exported model carries it on, so evaluation reads text as training did.
"""

from __future__ import annotations

import codecs
import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

BYTE_EOS_ID = 0
BYTE_VOCAB = 256
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"  # the name a prepared dataset and an exported model keep their tokenizer under


@dataclass
class Encoded:
    ids: np.ndarray  # [N] int32, without the trailing EOS
    dropped: int  # input symbols removed because they collide with the EOS id


class ByteTextStream:
    """Turns byte-token ids into text incrementally: a UTF-8 character split over tokens comes out
    whole; an id past the byte range (a byte-level model with a larger vocabulary) reads `<id>`."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if token >= BYTE_VOCAB:
            return self._decoder.decode(b"", final=True) + f"<{token}>"
        return self._decoder.decode(bytes([token]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class ByteTokenizer:
    name = "bytes"
    vocab_size = BYTE_VOCAB
    eos_id = BYTE_EOS_ID
    eos_token = None  # the end of a document is byte 0, which has no text

    def encode(self, text: str) -> Encoded:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        kept = raw[raw != BYTE_EOS_ID]
        return Encoded(kept.astype(np.int32), int(raw.size - kept.size))

    def decode(self, ids: list[int]) -> str:
        stream = ByteTextStream()
        return "".join(stream.push(t) for t in ids) + stream.flush()


class JsonTokenizer:
    """A Hugging Face `tokenizers` file; EOS is `eos_token` or the first known end token it holds."""

    def __init__(self, path: str | Path, eos_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer

        self.name, self.path = str(path), Path(path)
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
        self.eos_token: str = self._tokenizer.id_to_token(self.eos_id)

    def encode(self, text: str) -> Encoded:
        ids = np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)
        kept = ids[ids != self.eos_id]
        return Encoded(kept, int(ids.size - kept.size))

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


Tokenizer = ByteTokenizer | JsonTokenizer


def load_tokenizer(spec: str, eos_token: Optional[str] = None) -> Tokenizer:
    """`bytes` or the path of a tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise FileNotFoundError(errno.ENOENT, "--tokenizer is neither 'bytes' nor an existing tokenizer.json", spec)
    return JsonTokenizer(spec, eos_token)
