"""The snippets of README.md and docs/*.md, run as written.

Every ```python block runs as a script, `python snippet.py` in a fresh directory:
- a block that talks to a running suite (`localhost:50051`, the router's gRPC;
  `localhost:8000`, its OpenAI API) runs against one in-process suite (real gRPC,
  UCX and SmolLM2: router, prefill, decode, KV store) listening on those very
  ports. Where another process holds one, the suite takes a free port instead
  and the block's `localhost:50051` / `localhost:8000` is rewritten to it: the
  only change ever made to a block.
- the others start what they need themselves (an engine, a `Suite` of processes,
  UCX endpoints).
A block right after `<!-- not-run: reason -->` is a fragment (an interface's
signatures) and is reported as skipped with that reason.

Every `pdserve ...` line of a bash or sh block parses with the real command line
(a trailing `...` stands for the reader's own flags), and the Mooncake example
runs up to the requests it would send.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from pdserve.bench import workload
from pdserve.cli import build_parser
from pdserve.common.ports import in_use
from tests.service.suite import inprocess_suite, pools_full

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the suite fixture's loop

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not-run: (\S.*?) -->")
SUITE_ADDRESSES = ("localhost:50051", "localhost:8000")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    not_run: str | None  # the reason given in the markdown

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def needs_suite(self) -> bool:
        return any(a in self.code for a in SUITE_ADDRESSES)

    @property
    def loads_model(self) -> bool:
        return self.needs_suite or "LLMEngine(" in self.code or "Suite(" in self.code


def blocks(*langs: str) -> list[Block]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(2) not in langs:
                continue
            before = text[: m.start()].rstrip().rsplit("\n", 1)[-1]
            marker = NOT_RUN.fullmatch(before.strip())
            code = "\n".join(line[len(m.group(1)) :] for line in m.group(3).splitlines()) + "\n"
            out.append(
                Block(path, text.count("\n", 0, m.start()) + 1, m.group(2), code, marker.group(1) if marker else None)
            )
    return out


def params(selected: list[Block]) -> list:
    return [
        pytest.param(
            b,
            id=b.name,
            marks=[pytest.mark.skip(reason=f"not-run: {b.not_run}")]
            if b.not_run
            else [pytest.mark.slow]
            if b.loads_model
            else [],
        )
        for b in selected
    ]


PYTHON = blocks("python")


async def run_script(code: str, cwd: Path, timeout: float) -> str:
    """Run `code` as a script in `cwd`; its output, or a failure that shows it."""
    (cwd / "snippet.py").write_text(code)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "snippet.py", cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.send_signal(signal.SIGINT)  # a Suite in the snippet stops its processes on KeyboardInterrupt
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
        pytest.fail(f"the snippet ran past {timeout} s:\n{out.decode()}")
    assert proc.returncode == 0, f"the snippet failed (exit {proc.returncode}):\n{out.decode()}"
    return out.decode()


# -- shell -----------------------------------------------------------------------


def pdserve_lines() -> list[tuple[str, list[str]]]:
    out = []
    for b in blocks("bash", "sh"):
        for line in b.code.replace("\\\n", " ").splitlines():
            m = re.match(r"\s*(?:\w+=\S+\s+)*pdserve\s(.*)", line)
            if m:
                argv = shlex.split(m.group(1), comments=True)
                out.append((f"{b.name}: pdserve {shlex.join(argv)}", argv[:-1] if argv[-1:] == ["..."] else argv))
    return out


@pytest.mark.parametrize("line, argv", pdserve_lines(), ids=[name for name, _ in pdserve_lines()])
def test_every_pdserve_command_line_in_the_docs_parses(line, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed why
        pytest.fail(f"{line}: exit {e.code}")


@in_module_loop
async def test_the_mooncake_example_writes_a_trace_the_load_command_takes(tmp_path):
    (example,) = [b for b in blocks("sh") if "--trace mooncake_trace.jsonl" in b.code]
    lines = [line for line in example.code.splitlines() if "mooncake" in line]
    write, load = lines  # the writing command, then the load that replays it
    python, *argv = shlex.split(write, comments=True)  # `python`: the reader's, with pdserve installed
    assert python == "python"
    proc = await asyncio.create_subprocess_exec(sys.executable, *argv, cwd=tmp_path)
    assert await asyncio.wait_for(proc.wait(), 120) == 0
    args = build_parser().parse_args(shlex.split(load, comments=True)[1:])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        requests = workload.from_args(args)
    assert len(requests) == args.num_requests == 500
    assert max(len(r.prompt) for r in requests) == args.max_prompt_tokens  # some prompts were cut


# -- python ----------------------------------------------------------------------


def free(port: int) -> bool:
    return not in_use("127.0.0.1", port)  # as pdserve up tries its ports


@in_module_loop
@pytest.mark.parametrize("block", params([b for b in PYTHON if not b.needs_suite]))
async def test_a_snippet_that_brings_what_it_needs_runs(block, tmp_path):
    held = [p for p in map(int, re.findall(r"port=(\d+)", block.code)) if not free(p)]  # a Suite's own ports
    if held:
        pytest.skip(f"ports {held}, which the snippet names, are held by another process")
    await run_script(block.code, tmp_path, timeout=600)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(smollm2):
    """The in-process suite, and the rewrites the blocks need (none when the ports were free)."""
    ports = {"port": 50051 if free(50051) else 0, "http_port": 8000 if free(8000) else 0}
    async with inprocess_suite(smollm2, store_blocks=256, router_kw=ports) as s:
        yield s, {"localhost:50051": f"localhost:{s.router.port}", "localhost:8000": f"localhost:{s.router.http.port}"}


@in_module_loop
@pytest.mark.parametrize("block", params([b for b in PYTHON if b.needs_suite]))
async def test_a_snippet_runs_against_a_running_suite(block, suite, tmp_path):
    running, rewrites = suite
    code = block.code
    for documented, actual in rewrites.items():
        code = code.replace(documented, actual)
    out = await run_script(code, tmp_path, timeout=300)
    assert out.strip(), "the snippet printed nothing"
    await pools_full(running)  # every stream it opened has ended and freed its blocks
