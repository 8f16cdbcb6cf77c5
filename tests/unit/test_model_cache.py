"""Where converted GGUF models are cached: one copy per file contents, wherever it is installed."""
from __future__ import annotations

import os

from pdserve.common import model_loader


def _gguf(path, body: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def test_the_same_file_at_two_paths_shares_one_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    body = os.urandom(3 << 20)  # longer than the head and tail samples together
    a = _gguf(tmp_path / "venv-a" / "m.gguf", body)
    b = _gguf(tmp_path / "venv-b" / "m.gguf", body)
    os.utime(b, ns=(0, 0))  # a fresh install: another path, another mtime
    assert model_loader.converted_dir(a) == model_loader.converted_dir(b)
    assert model_loader.converted_dir(a).parent == tmp_path / "cache" / "models"


def test_different_contents_or_sizes_convert_apart(tmp_path):
    body = bytearray(os.urandom(3 << 20))
    a = _gguf(tmp_path / "a" / "m.gguf", bytes(body))
    body[-1] ^= 1  # the last byte differs
    b = _gguf(tmp_path / "b" / "m.gguf", bytes(body))
    c = _gguf(tmp_path / "c" / "m.gguf", bytes(body) + b"\0")
    assert len({model_loader.converted_dir(p) for p in (a, b, c)}) == 3
