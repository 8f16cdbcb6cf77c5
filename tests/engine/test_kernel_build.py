"""How the kernels build: each source into an object of its own, cached by its inputs, then one link."""

import os
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

from pdserve.common.engine import kernels

COMPILER = shutil.which(os.environ.get("CXX", "g++"))
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to build the kernels")
INCLUDES = [f"-I{p}" for p in cpp_extension.include_paths()]


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture
def cache(module_cache, monkeypatch):
    monkeypatch.setattr(kernels, "cache_dir", lambda: module_cache)
    return module_cache


@pytest.fixture
def greedy(cache):
    """greedy.cpp (the quickest to compile) and its object, compiled once for the module."""
    source = kernels.HERE / "greedy.cpp"
    return source, kernels._compile(COMPILER, INCLUDES, source, kernels.cache_dir() / "objects")


class CompiledAgain(Exception):
    pass


def test_a_source_compiles_once_and_an_edit_compiles_it_again(cache, greedy, monkeypatch):
    source, first = greedy
    assert first.exists() and first.parent == cache / "objects" and first.name.startswith("greedy-")

    def compiled_again(*args, **kwargs):
        raise CompiledAgain(args[0])

    monkeypatch.setattr(subprocess, "run", compiled_again)
    assert (
        kernels._compile(COMPILER, INCLUDES, source, kernels.cache_dir() / "objects") == first
    )  # the same inputs: the cached object

    edited = cache / "greedy.cpp"
    edited.write_bytes(source.read_bytes() + b"// edited\n")
    with pytest.raises(CompiledAgain):
        kernels._compile(COMPILER, INCLUDES, edited, kernels.cache_dir() / "objects")


def test_a_header_edit_compiles_every_source_again(cache, greedy, monkeypatch):
    source, first = greedy
    header = cache / "vec.h"
    header.write_bytes((kernels.HERE / "vec.h").read_bytes() + b"// edited\n")
    monkeypatch.setattr(kernels, "HEADERS", (header, *(h for h in kernels.HEADERS if h.name != "vec.h")))
    again = kernels._compile(
        COMPILER, INCLUDES, source, kernels.cache_dir() / "objects"
    )  # greedy.cpp includes no header of ours: compiled anyway
    assert again != first and again.exists()


def test_a_source_that_does_not_compile_is_named_in_the_error(cache):
    bad = cache / "broken.cpp"
    bad.write_text("int broken = ;\n")
    with pytest.raises(RuntimeError, match="failed on broken.cpp"):
        kernels._compile(COMPILER, INCLUDES, bad, kernels.cache_dir() / "objects")
    assert not list((cache / "objects").glob("broken*")), "no object, not even a partial one"


def test_builds_go_under_home_where_the_model_cache_is_read_only(tmp_path, monkeypatch):
    # A Kubernetes pod's root filesystem is read-only, and the image's model cache is on it.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(blocker / "cache"))  # nothing can be made under a file
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert kernels.cache_dir() == tmp_path / "home" / ".cache" / "pdserve" / "kernels"
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))  # writable: beside the models
    assert kernels.cache_dir() == tmp_path / "cache" / "kernels"
