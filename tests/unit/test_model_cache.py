"""Model identity: converted GGUF models are cached once per file contents, wherever installed,
and a checkpoint's weights digest (in the KV fingerprint) changes with any byte of its weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdserve.common import cache_dirs, model_loader


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


def test_different_contents_or_sizes_convert_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    body = bytearray(os.urandom(3 << 20))
    a = _gguf(tmp_path / "a" / "m.gguf", bytes(body))
    body[-1] ^= 1  # the last byte differs
    b = _gguf(tmp_path / "b" / "m.gguf", bytes(body))
    c = _gguf(tmp_path / "c" / "m.gguf", bytes(body) + b"\0")
    body[len(body) // 2] ^= 1  # and one in the middle, far from either end
    d = _gguf(tmp_path / "d" / "m.gguf", bytes(body))
    assert len({model_loader.converted_dir(p) for p in (a, b, c, d)}) == 4


def _checkpoint(path, body: bytes):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(body)
    return path


def test_checkpoints_differing_only_in_the_middle_have_different_weights_digests(tmp_path, monkeypatch):
    # A fine-tune of a few middle layers: same names, shapes and size, same first and last MiB.
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    body = bytearray(os.urandom(3 << 20))
    base = _checkpoint(tmp_path / "base", bytes(body))
    body[len(body) // 2] ^= 1
    tuned = _checkpoint(tmp_path / "tuned", bytes(body))
    assert model_loader.resolve(str(base)).weights_digest != model_loader.resolve(str(tuned)).weights_digest
    assert model_loader.resolve(str(base)).weights_digest == model_loader.resolve(str(base)).weights_digest


def test_the_same_weights_under_another_rope_config_have_another_digest(tmp_path, monkeypatch):
    # The KV fingerprint takes this digest: blocks computed under another rope must not be reused.
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    body = os.urandom(1 << 20)
    a, b, c = (_checkpoint(tmp_path / n, body) for n in "abc")
    (a / "config.json").write_text('{"rope_theta": 10000.0, "transformers_version": "4.57.0"}')
    (b / "config.json").write_text('{"rope_theta": 100000.0, "transformers_version": "4.57.0"}')
    (c / "config.json").write_text('{\n  "transformers_version": "5.1.0",\n  "rope_theta": 10000.0\n}')  # a re-save
    digests = [model_loader.resolve(str(p)).weights_digest for p in (a, b, c)]
    assert digests[0] != digests[1] and digests[0] == digests[2]


def test_a_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    f = _gguf(tmp_path / "m.gguf", os.urandom(1 << 20))
    first = model_loader._file_digest(f)
    hashed = []
    monkeypatch.setattr(model_loader.hashlib, "file_digest", lambda *a: hashed.append(a) or None)
    assert model_loader._file_digest(f) == first and not hashed  # remembered: not read again
    monkeypatch.undo()
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    f.write_bytes(os.urandom(1 << 20))  # rewritten: new size or mtime, hashed again
    os.utime(f, ns=(1, 1))
    assert model_loader._file_digest(f) != first


@pytest.fixture
def read_only_cache(tmp_path, monkeypatch):
    """PDSERVE_CACHE_DIR on a read-only filesystem, as an image's in a Kubernetes pod: readable, and
    os.access says no write (root's permission bits can't make that here)."""
    image = tmp_path / "image-cache"
    (image / "models").mkdir(parents=True)
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(image))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real = os.access
    monkeypatch.setattr(cache_dirs.os, "access", lambda p, mode: real(p, mode) and image not in Path(p).parents)
    return image


def test_a_read_only_cache_is_read_and_what_is_new_goes_under_the_home(tmp_path, read_only_cache, monkeypatch):
    home_models = tmp_path / "home" / ".cache" / "pdserve" / "models"
    shipped = _gguf(tmp_path / "shipped.gguf", os.urandom(1 << 20))
    in_image = read_only_cache / "models" / model_loader.converted_dir(shipped).name
    (in_image).mkdir()
    (in_image / model_loader._META).write_text("{}")  # the image converted it at build time
    assert model_loader.converted_dir(shipped) == in_image
    mounted = _gguf(tmp_path / "mounted.gguf", os.urandom(1 << 20))  # a model of the user's own
    assert model_loader.converted_dir(mounted).parent == home_models
    hashed = []
    monkeypatch.setattr(model_loader.hashlib, "file_digest", lambda *a: hashed.append(a) or None)
    model_loader._file_digest(mounted)
    assert not hashed and (home_models / "digests.json").exists()  # remembered under the home, not hashed again


def test_a_hub_cache_file_is_identified_by_the_hash_it_is_stored_under(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    sha = "ab" * 32
    blob = tmp_path / "models--org--m" / "blobs" / sha
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    snapshot = tmp_path / "models--org--m" / "snapshots" / "rev" / "model.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    assert model_loader._file_digest(snapshot) == sha[:32]


def _hub_cache(root, repo_id: str, files: dict[str, bytes]):
    """A Hugging Face hub cache holding one snapshot of `repo_id`, as a download leaves it."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("rev1")
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    for name, body in files.items():
        (snapshot / name).write_bytes(body)
    return snapshot


def test_a_hub_id_resolves_to_its_snapshot_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # no network: the cache alone
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _hub_cache(tmp_path / "hub", "org/tiny", {"config.json": b"{}", "model.safetensors": b"w" * 64})
    ref = model_loader.resolve("org/tiny")
    assert (ref.name, ref.path) == ("org/tiny", snapshot)  # served under the id it was asked by
    copy = _checkpoint(tmp_path / "copy", b"w" * 64)  # the same weights in a plain directory
    assert ref.weights_digest == model_loader.resolve(str(copy)).weights_digest
    assert model_loader.resolve("org/tiny", weights=False).weights_digest == ""  # router, store: no hashing
    with pytest.raises(FileNotFoundError, match="hub"):
        model_loader.resolve("org/not-in-the-cache")
