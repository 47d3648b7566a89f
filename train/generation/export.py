"""A consolidated, framework-free model file for inference: `model.safetensors` + `model.yaml`,
with the files `transformers` reads beside them.

`save_exported` writes the weights of one full (unsharded) model, its config and the weights' size
and SHA-256 (`checksums.json`); `load_model` rebuilds a TTTLM from such a folder, checking the
weights against that record first (folders exported before it existed are read unchecked), and
names the file when one is missing, damaged or unreadable. Training checkpoints are sharded per
rank (ZeRO 1/2/3); `python -m train.generation.export CHECKPOINT_DIR OUT_DIR` consolidates one into this format, which
generation and evaluation read. CHECKPOINT_DIR is a `step_N` folder or a checkpoints root (its
newest complete checkpoint); the model config comes from the checkpoint's run.yaml, and the
tokenizer from the run's prepared data (`--tokenizer` names another).

The folder also holds config.json (`train.hf.TTTLAConfig`), so that after `import train.hf`
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it, and, when the run used a tokenizer.json,
that file with a tokenizer_config.json (`AutoTokenizer.from_pretrained(OUT_DIR)`). A byte-level
run has no tokenizer files: its text is UTF-8 bytes (`train.data.tokenizer.ByteTokenizer`).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ConfigError, LMConfig, load_model_config
from model.lm import TTTLM
from train.checkpoint import MARKER, RUN_CONFIG, complete_checkpoints
from train.checkpoint_integrity import file_records, file_sha256, verify
from train.data.tokenizer import TOKENIZER_FILE, ByteTokenizer, JsonTokenizer, Tokenizer, load_tokenizer
from train.job.cli import DEBUG_HELP, run_command

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.yaml"
CHECKSUMS_FILE = "checksums.json"  # {WEIGHTS_FILE: {"size", "sha256"}}, written last
EXPORT_HINT = "export the checkpoint again (python -m train.generation.export CHECKPOINT OUT)"
HF_CONFIG_FILE = "config.json"  # transformers' model config
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # what AutoTokenizer reads beside tokenizer.json
DEFAULT_FILE_MODE = 0o666  # what open() would create, before the umask


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_exported(model: TTTLM, folder: str | Path, tokenizer: Optional[Tokenizer] = None) -> Path:
    """Write the model's weights (tied weights once), its config, the transformers files (config.json,
    and `tokenizer`'s files when it is a tokenizer.json; default: bytes) and, last, the weights' checksum."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    os.chmod(folder / WEIGHTS_FILE, DEFAULT_FILE_MODE & ~current_umask())  # safetensors creates it 0600
    OmegaConf.save(OmegaConf.structured(model.cfg), folder / CONFIG_FILE)
    save_transformers_files(model.cfg, tokenizer or ByteTokenizer(), folder)
    (folder / CHECKSUMS_FILE).write_text(json.dumps(file_records(folder, [WEIGHTS_FILE], 0, 1), indent=1) + "\n")
    return folder


def save_transformers_files(cfg: LMConfig, tokenizer: Tokenizer, folder: Path) -> None:
    """config.json, and for a tokenizer.json the file itself and the tokenizer_config.json that makes
    it a `PreTrainedTokenizerFast` (left padding: batched decoding needs it, see train.hf.modeling)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={cfg.vocab_size}; export with the run's own tokenizer")
    from train.hf.config import TTTLAConfig  # transformers: only where an export is written

    hf_config = TTTLAConfig.from_lm_config(cfg, architectures=["TTTLAForCausalLM"], eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
    hf_config.save_pretrained(folder)
    if isinstance(tokenizer, JsonTokenizer):
        shutil.copyfile(tokenizer.path, folder / TOKENIZER_FILE)
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token, "pad_token": tokenizer.eos_token, "padding_side": "left"}
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def load_exported_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of an exported model: its tokenizer.json (with the end token its
    tokenizer_config.json names), or bytes where it has none."""
    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    settings = folder / TOKENIZER_CONFIG_FILE
    eos_token = json.loads(settings.read_text()).get("eos_token") if settings.is_file() else None
    return JsonTokenizer(folder / TOKENIZER_FILE, eos_token)


def check_exported(folder: str | Path) -> None:
    """Raise, naming the file, where `folder` lacks a file `load_model` reads."""
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (Path(folder) / name).is_file():
            raise FileNotFoundError(
                errno.ENOENT, "no exported model here: export a checkpoint first (python -m train.generation.export CHECKPOINT OUT)", str(Path(folder) / name)
            )


def check_weights(folder: Path) -> None:
    """The weights against the size and SHA-256 recorded at export; ValueError naming the file if they differ."""
    record_path, weights = folder / CHECKSUMS_FILE, folder / WEIGHTS_FILE
    if not record_path.is_file():
        return  # exported before checksums were recorded
    try:
        record = json.loads(record_path.read_text())[WEIGHTS_FILE]
        size, sha256 = int(record["size"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{record_path} is damaged ({type(error).__name__}: {error}); {EXPORT_HINT}") from error
    if weights.stat().st_size != size:
        raise ValueError(f"{weights} is {weights.stat().st_size} bytes, {CHECKSUMS_FILE} records {size}: it is damaged; {EXPORT_HINT}")
    if file_sha256(weights) != sha256:
        raise ValueError(f"{weights} does not match the checksum in {CHECKSUMS_FILE}: it is damaged; {EXPORT_HINT}")


def read_exported_config(path: Path) -> LMConfig:
    """The model config of an export; ValueError naming the file when it cannot be read as one."""
    try:
        return load_model_config(str(path))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML{where} ({getattr(error, 'problem', None) or error}); {EXPORT_HINT}") from error
    except (OmegaConfBaseException, ConfigError) as error:
        raise ValueError(f"{path} is not a valid model config ({str(error).splitlines()[0]}); {EXPORT_HINT}") from error


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[TTTLM, LMConfig]:
    """Rebuild the model saved by `save_exported`; a missing, damaged or unreadable file is named in a
    FileNotFoundError or ValueError."""
    folder = Path(folder)
    check_exported(folder)
    check_weights(folder)
    cfg = read_exported_config(folder / CONFIG_FILE)
    model = TTTLM(cfg)
    weights = folder / WEIGHTS_FILE
    try:
        model.load_state_dict(load_file(str(weights)))
    except SafetensorError as error:
        raise ValueError(f"{weights} is not a readable safetensors file ({error}); {EXPORT_HINT}") from error
    except RuntimeError as error:  # names or shapes that are not those of the model in CONFIG_FILE
        reason = " ".join(str(error).split())[:300]
        raise ValueError(f"{weights} does not hold the model {CONFIG_FILE} describes ({reason}); {EXPORT_HINT}") from error
    return model.to(device=device, dtype=dtype).eval(), cfg


def consolidated_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a sharded training checkpoint folder (`.../checkpoints/step_N`), any ZeRO
    stage, as one state dict with the keys of the module the engine wrapped."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # heavy; export only

    checkpoint = Path(checkpoint)
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def strip_wrapper_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Keys of a wrapped model (`<wrapper>.embed.weight`) renamed to the plain TTTLM's."""
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        matches = [".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in expected]
        if not matches:
            raise ValueError(f"checkpoint tensor {key!r} matches no parameter of the model in its run.yaml")
        renamed[matches[0]] = tensor
    missing = expected - renamed.keys()
    if missing:
        raise ValueError(f"checkpoint lacks model tensors {sorted(missing)}")
    return renamed


def resolve_checkpoint(path: str | Path) -> Path:
    """A `step_N` folder, or a checkpoints root (its newest complete checkpoint)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(errno.ENOENT, f"neither a complete checkpoint (no {MARKER}) nor a folder holding one", str(path))
    return found[-1]


def export_checkpoint(checkpoint: str | Path, out: str | Path, tokenizer: Optional[str] = None) -> Path:
    """Consolidate a sharded checkpoint (ZeRO 1/2/3) into `out` as model.safetensors + model.yaml and
    the transformers files; `tokenizer` ('bytes' or a tokenizer.json) overrides the run's data's."""
    folder = resolve_checkpoint(checkpoint)
    reason = verify(folder, rank=0, world=1)
    if reason:
        raise ValueError(f"{folder} is damaged: {reason}; export an older step_* folder")
    from train.data.prepare import dataset_tokenizer  # imports the streaming library; export only

    run_config = OmegaConf.load(folder / RUN_CONFIG)
    cfg: LMConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LMConfig), run_config.model))
    text = load_tokenizer(tokenizer) if tokenizer else dataset_tokenizer(run_config.data.path)
    model = TTTLM(cfg.validate())
    state = strip_wrapper_prefix(consolidated_state_dict(folder), set(model.state_dict()))
    model.load_state_dict(state)
    return save_exported(model, out, text)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.generation.export", description=__doc__.split("\n\n")[0], epilog=DEBUG_HELP)
    parser.add_argument("checkpoint", help="a step_N folder or a checkpoints root (its newest complete checkpoint)")
    parser.add_argument("out", help="the export folder")
    parser.add_argument("--tokenizer", default=None, help="'bytes' or a tokenizer.json (default: the one the run's data was prepared with)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    folder = export_checkpoint(args.checkpoint, args.out, args.tokenizer)
    print(f"exported {resolve_checkpoint(args.checkpoint)} -> {folder}")


if __name__ == "__main__":
    run_command("train.generation.export", main, sys.argv[1:])
