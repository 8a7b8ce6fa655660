"""The README's fenced blocks: the ones marked `<!-- test: tiny -->` run, in order, on tiny stand-ins; the rest
are checked.

Every fenced block carries one mark on the line before its fence:
- `tiny`: run here, top to bottom, in one temporary workspace (a block may use what an earlier one wrote).
  Shell blocks run with bash (-e, -o pipefail), Python blocks are fed to the venv's python on stdin, both in the
  repository root with the venv's bin/ first on PATH (as after `source .venv/bin/activate`). The real-size values
  the README shows are mapped to stand-ins by `substitutions()` (one table, each entry says why); a Ray head on
  127.0.0.1 serves `ray job submit`, stopped by its own processes' ids.
- `gpu`: needs a GPU cluster or hub weights; `ci`: run by CI elsewhere (`make test` is this suite, `make demo
  PRESET=quick` is tests/pipelines/test_demo.py). Both are checked, not run: `bash -n`, the flags of every
  `unicap SUBCOMMAND`, `python -m <this repo's module>` and `ray SUBCOMMAND` against its --help, `make`'s targets
  and variables against the Makefile, every `CONFIG=` loaded with its `ARGS=`; `ci` blocks also `make -n`.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import RayHead

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
MARKS = ("tiny", "gpu", "ci")
MARK = re.compile(r"^<!-- test: (\w+) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")
LANGUAGES = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python"}
DATA = "/data/unicap"  # the README's data folder
REPO_PACKAGES = ("unicap", "datagen", "pipelines", "train")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    mark: str | None
    text: str

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.mark}, {self.lang})"


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md:{start + 1}: a fence that is never closed")
        mark = MARK.match(lines[start - 1].strip()) if start else None
        blocks.append(Block(start + 1, m.group(1), mark.group(1) if mark else None, "\n".join(lines[start + 1 : i])))
        i += 1
    return blocks


# ---------------------------------------------------------------- the substitution table


def substitutions(ws: Path, ray_dashboard: str, captioner: Path, max_pixels: int, port: int) -> dict[str, str]:
    """README value -> its tiny stand-in, applied to `tiny` blocks in this order (longer keys before the keys
    they contain). Every key must occur in some `tiny` block (test_every_substitution_is_used)."""
    return {
        # the CPU configs train 40 / 20 / 20 steps: 2 each and a 2-step sample grid, through the Makefile's ARGS
        f"make stage1 stage2 stage3 DATA={DATA}": f"make stage1 stage2 stage3 DATA={DATA} "
        'ARGS="run.steps=2 run.save_every=2 run.sample_steps=2 run.progress=false"',
        # a Ray cluster's head node -> the head this test starts on 127.0.0.1
        "http://head-node:8265": ray_dashboard,
        # the pool: 16 synthetic images in 2 shards (the jobs' per-shard paths run more than once); 4 of them have a
        # short side >= 1024 px, so stage2 / stage3 keep the paper's rule and are not empty
        "--n 10000 --seed 0 --shard-size 1000": "--n 16 --seed 0 --shard-size 8",
        # the held-out set: 8 images are enough for eval-captions to score every column
        "--n 1000 --seed 7777": "--n 8 --seed 7777",
        # the VLMs (hub ids, no hub here) -> the tiny captioner trained on this machine: it writes real,
        # measurable captions, so the pool's rows are ok and the stages are not empty
        "Qwen/Qwen2.5-VL-7B-Instruct": str(captioner),
        "Qwen/Qwen2-VL-2B-Instruct": str(captioner),
        # ... at the resolution it was trained at (168 x 168 px), in the caption job and the fine-tune alike
        "200704": str(max_pixels),
        # 8 GPUs -> 1 CPU rank; a free rendezvous port (a developer's run may hold the default one)
        "--nproc 8": f"--nproc 1 --master-port {port}",
        # one forward per step on one rank (micro 4 x 1 x 1), and 2 steps instead of 3,000
        "data.global_batch=256": "data.global_batch=4",
        "run.steps=3000": "run.steps=2",
        # one engine / CLIP actor on 2 cores
        "--concurrency 8": "--concurrency 1",
        # CLIP weights cannot be downloaded: the tiny random CLIP, whose random embeddings call every image a near
        # duplicate of every other (exact duplicates are still found)
        "ViT-L-14:datacomp_xl_s13b_b90k": "tiny --no-near-dedup",
        # the LAION aesthetic head (a file on the user's disk) -> a random head of the tiny CLIP's width
        "/models/sac+logos+ava1-l14-linearMSE.pth": "tiny",
        # sampling: the CPU configs train at 64-128 px; 2 Euler steps
        "--size 1024x1024": "--size 64x64",
        "--steps 15": "--steps 2",
        # the data folder -> this test's temporary workspace (last: the keys above contain it)
        DATA: str(ws / "unicap"),
    }


def substitute(text: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------- structure (fast)


def test_every_fenced_block_is_marked():
    blocks = readme_blocks()
    assert len(blocks) >= 10, "the README lost its blocks"
    unmarked = [str(b) for b in blocks if b.mark not in MARKS]
    assert not unmarked, f"fenced blocks without <!-- test: tiny|gpu|ci --> on the line before: {unmarked}"
    wrong_lang = [str(b) for b in blocks if b.lang not in LANGUAGES]
    assert not wrong_lang, f"fence languages must be one of {sorted(LANGUAGES)}: {wrong_lang}"
    # indented code blocks escape the marks: no command line may sit outside a fence
    fenced = {n for b in blocks for n in range(b.line, b.line + b.text.count("\n") + 2)}
    commands = re.compile(r"^ {4,}(\$ )?(unicap|make|python|ray|pip|bash|torchrun|deepspeed) ")
    stray = [n for n, ln in enumerate(README.read_text().splitlines(), 1) if n not in fenced and commands.match(ln)]
    assert not stray, f"README.md lines {stray}: an indented command outside a marked fence"


def test_marks_are_parsed():
    text = "a\n<!-- test: tiny -->\n```bash\necho 1\n```\n\n```python\nx = 1\n```\n"
    a, b = readme_blocks(text)
    assert (a.mark, a.lang, a.text, a.line) == ("tiny", "bash", "echo 1", 3)
    assert (b.mark, b.lang) == (None, "python")


def test_every_substitution_is_used():
    tiny = [b.text for b in readme_blocks() if b.mark == "tiny"]
    table = substitutions(Path("/ws"), "http://127.0.0.1:1", Path("/captioner"), 28224, 1)
    unused = [k for k in table if not any(k in t for t in tiny)]
    assert not unused, f"substitution keys no tiny block uses any more (update the table): {unused}"
    left = [str(b) for b in readme_blocks() if b.mark == "tiny" and DATA in substitute(b.text, table)]
    assert not left, left


# ---------------------------------------------------------------- checked blocks (gpu, ci)


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments dropped, split at ; && || | &."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        cmd: list[str] = []
        for tok in lex:
            if tok in (";", "&&", "||", "|", "&"):
                out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
        out.append(cmd)
    return [c for c in out if c]


def flags(args: list[str]) -> list[str]:
    """The --options of a command line, up to a bare `--`."""
    out = []
    for a in args:
        if a == "--":
            break
        if a.startswith("--"):
            out.append(a.split("=", 1)[0])
    return out


@cache
def help_flags(*prog: str) -> frozenset[str]:
    r = subprocess.run([*prog, "--help"], cwd=ROOT, env=block_env(None), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(prog)} --help failed: {r.stderr[-2000:]}"
    return frozenset(re.findall(r"--[A-Za-z][\w-]*", r.stdout))


def makefile_targets_and_variables() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text()
    targets = set()
    for m in re.finditer(r"^([A-Za-z0-9_. $()-][^:=\n]*):(?!=)", text, re.M):
        targets.update(m.group(1).split())
    variables = set(re.findall(r"\$\(([A-Z_]+)\)", text))
    return targets, variables


def check_command(cmd: list[str], where: str) -> None:
    prog = Path(cmd[0]).name
    if prog == "unicap":
        from unicap.cli import COMMANDS

        sub = cmd[1]
        assert sub in COMMANDS, f"{where}: `unicap {sub}` is not a subcommand"
        unknown = set(flags(cmd[2:])) - help_flags(str(BIN / "unicap"), sub)
        assert not unknown, f"{where}: `unicap {sub}` has no {sorted(unknown)}"
    elif prog.startswith("python") and cmd[1:2] == ["-m"]:
        module = cmd[2]
        if module.split(".")[0] in REPO_PACKAGES:  # this repo's modules only (vllm's --help takes long)
            unknown = set(flags(cmd[3:])) - help_flags(sys.executable, "-m", module)
            assert not unknown, f"{where}: `python -m {module}` has no {sorted(unknown)}"
    elif prog == "ray":
        words = [w for w in cmd[1:3] if not w.startswith("-")][: 2 if cmd[1:2] == ["job"] else 1]
        unknown = set(flags(cmd[1 + len(words) :])) - help_flags(str(BIN / "ray"), *words)
        assert not unknown, f"{where}: `ray {' '.join(words)}` has no {sorted(unknown)}"
        if "--" in cmd:  # ray job submit ... -- ENTRYPOINT
            check_command(cmd[cmd.index("--") + 1 :], where)
    elif prog == "make":
        from train.config import load as load_train_config

        targets, variables = makefile_targets_and_variables()
        assigned = dict(a.split("=", 1) for a in cmd[1:] if "=" in a)
        wanted = [a for a in cmd[1:] if "=" not in a and not a.startswith("-")]
        assert set(wanted) <= targets, f"{where}: no make target {sorted(set(wanted) - targets)}"
        assert set(assigned) <= variables, f"{where}: the Makefile reads no {sorted(set(assigned) - variables)}"
        if "CONFIG" in assigned:
            load_train_config(ROOT / assigned["CONFIG"], shlex.split(assigned.get("ARGS", "")))


@pytest.mark.slow
def test_checked_blocks_parse_and_use_real_flags():
    checked = [b for b in readme_blocks() if b.mark in ("gpu", "ci")]
    assert checked
    for b in checked:
        if LANGUAGES[b.lang] == "python":
            compile(b.text, str(b), "exec")
            continue
        r = subprocess.run(["bash", "-n"], input=b.text, capture_output=True, text=True)
        assert r.returncode == 0, f"{b}: bash -n: {r.stderr}"
        for cmd in commands(b.text):
            check_command(cmd, str(b))
        if b.mark == "ci":
            makes = [c for c in commands(b.text) if c[0] == "make"]
            targets = [a for c in makes for a in c[1:]]
            r = subprocess.run(
                ["make", "-n", *targets], cwd=ROOT, env=block_env(None), capture_output=True, text=True, timeout=120
            )
            assert r.returncode == 0, f"{b}: make -n {' '.join(targets)}: {r.stderr[-2000:]}"


def test_command_splitting():
    script = "a --x 1 \\\n  --y=2 && b -- c --z  # note\nprintf 'p q\\n' > hosts\nd '{\"k\": 1}' &\n"
    assert commands(script) == [
        ["a", "--x", "1", "--y=2"],
        ["b", "--", "c", "--z"],
        ["printf", "p q\\n", ">", "hosts"],
        ["d", '{"k": 1}'],
    ]
    assert flags(["--x", "1", "--y=2", "--", "--z"]) == ["--x", "--y"]


# ---------------------------------------------------------------- running the tiny blocks


def block_env(ws: Path | None) -> dict[str, str]:
    """The environment of a README command: the venv first on PATH, no outer make or Ray state, offline."""
    drop = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "RAY_ADDRESS", "VERBOSE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(BIN.parent)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1")
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # what `make` exports to the suite, for runs of this file outside make
    env.setdefault("UNICAP_CACHE", str(ROOT / ".cache"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(env["UNICAP_CACHE"]) / "torch_extensions"))
    if shutil.which("nvidia-smi") is None:
        env.setdefault("DS_ACCELERATOR", "cpu")
    if ws is not None:
        env["HF_HOME"] = str(ws / "hf")  # datasets' Arrow cache stays in the workspace
    return env


def free_port() -> int:
    from tests.conftest import free_port as port

    return port()


def tiny_captioner() -> tuple[Path, int]:
    """The tiny captioner shipped in models/ (pipelines.tiny_models) and the resolution it was trained at."""
    from train.captioner import tiny

    return tiny.tiny_captioner(), tiny.max_pixels()


# apache/arrow#34314 (open upstream): after pandas/pyarrow read Parquet, the interpreter can abort at exit
# (SIGABRT, this message) when a Parquet reader thread outlives Arrow's teardown. The block's own work is done
# by then; seen once in ~20 suite runs (the README's pandas block, in a fresh-clone `make test` of stop 18).
ARROW_EXIT_ABORT = "terminate called without an active exception"
# printed after a Python block's last statement, so that an abort at exit is told from an abort in the block
BLOCK_DONE = "<<README block: every statement ran>>"


def run_block(block: Block, text: str, env: dict[str, str], log: Path) -> tuple[str, float]:
    """Run one block; its output and the CPU seconds (user + system) of the processes it waited for.

    A Python block that aborts with ARROW_EXIT_ABORT after BLOCK_DONE was printed passes (with a line saying so):
    that is the upstream Arrow teardown abort, after every statement of the block ran. Any other exit fails it."""
    if LANGUAGES[block.lang] == "shell":
        cmd, stdin = ["bash", "-e", "-o", "pipefail", "-c", text], None
    else:  # as pasted into python in the repository root, then the marker
        cmd, stdin = [sys.executable, "-"], f"{text}\nprint({BLOCK_DONE!r}, flush=True)\n"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(
        cmd,
        input=stdin,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        start_new_session=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    log.write_text(f"$ {block}\n{text}\n\n{r.stdout}")
    _, done, after_done = r.stdout.partition(BLOCK_DONE)
    if r.returncode == -signal.SIGABRT and done and ARROW_EXIT_ABORT in after_done:
        print(f"{block}: aborted at interpreter exit after its last statement (apache/arrow#34314); passed")
    elif r.returncode != 0:
        raise BlockFailed(f"{block} failed (exit {r.returncode}); log {log}:\n{text}\n...\n{r.stdout[-4000:]}")
    return r.stdout, cpu


class BlockFailed(AssertionError):
    pass


def test_an_abort_at_exit_after_the_last_statement_passes_and_any_other_fails(tmp_path):
    """The Arrow exit abort is told apart by where it happens (after the block's last statement) and its message."""

    def abort(message: str, at_exit: bool) -> str:
        act = f"(sys.stderr.write({message!r} + '\\n'), sys.stderr.flush(), os.abort())"
        return "import atexit, os, sys\n" + (f"atexit.register(lambda: {act})\nx = 1" if at_exit else act)

    env, log = block_env(None), tmp_path / "block.log"

    def run(text: str) -> str:
        return run_block(Block(1, "python", "tiny", text), text, env, log)[0]

    out = run(abort(ARROW_EXIT_ABORT, at_exit=True))
    assert BLOCK_DONE in out and ARROW_EXIT_ABORT in out
    with pytest.raises(BlockFailed, match="exit -6"):  # the same abort inside the block
        run(abort(ARROW_EXIT_ABORT, at_exit=False))
    with pytest.raises(BlockFailed, match="exit -6"):  # another abort at exit
        run(abort("double free or corruption", at_exit=True))
    with pytest.raises(BlockFailed, match="exit 1"):
        run("raise SystemExit(1)")


def stamp_is_current() -> None:
    """The make blocks would reinstall the venv when its stamp is older than pyproject.toml: say so instead."""
    stamps = sorted((BIN.parent).glob(".unicap-installed-*"))
    assert stamps, f"{BIN.parent} has no install stamp: run `make install` (or `make test`) first"
    r = subprocess.run(["make", "-q", str(stamps[0].relative_to(ROOT))], cwd=ROOT, env=block_env(None))
    assert r.returncode == 0, "the venv is older than pyproject.toml / the constraints: run `make install` first"


@pytest.mark.slow
# a few minutes on 2 idle cores; a machine without the tiny captioner in its cache trains it first
@pytest.mark.timeout(2400)
def test_tiny_blocks_run_in_order(tmp_path):
    blocks = [b for b in readme_blocks() if b.mark == "tiny"]
    if any(b.text.lstrip().startswith("make ") or "\nmake " in b.text for b in blocks):
        stamp_is_current()
    ws = tmp_path
    (ws / "logs").mkdir()
    env = block_env(ws)
    needs_ray = [i for i, b in enumerate(blocks) if "ray job submit" in b.text]
    head = RayHead(env) if needs_ray else None  # started first: its job agent comes up while blocks run
    try:
        t0 = time.time()
        captioner, max_pixels = tiny_captioner()
        print(f"tiny captioner {captioner} ({time.time() - t0:.0f}s)")
        table = substitutions(ws, head.address if head else "", captioner, max_pixels, free_port())
        times = []
        for i, block in enumerate(blocks):
            text = substitute(block.text, table)
            log = ws / "logs" / f"{i:02d}-line{block.line}.log"
            t0 = time.time()
            for attempt in range(20):
                try:
                    out, cpu = run_block(block, text, env, log)
                    break
                except BlockFailed as e:
                    # the head's job agent comes up a few seconds after `ray start` returns
                    if "No available agent to submit job" not in str(e) or attempt == 19:
                        raise
                    time.sleep(3)
            if "ray job submit" in block.text:
                assert "succeeded" in out.lower(), f"{block}: the job did not succeed:\n{out[-3000:]}"
            times.append((time.time() - t0, cpu))
            print(f"{times[-1][0]:6.1f}s wall {cpu:6.1f}s cpu  {block}", flush=True)
            if head and i == needs_ray[-1]:
                head.stop()
                head = None
        wall, cpu = sum(t for t, _ in times), sum(c for _, c in times)
        print(f"tiny blocks: {wall:.0f}s wall, {cpu:.0f}s cpu (processes that were waited for)")
    finally:
        if head:
            head.stop()
    check_outputs(ws / "unicap")


def check_outputs(data: Path) -> None:
    """What the blocks wrote, where the README says they write it (a block that ran but wrote elsewhere fails)."""
    import pandas as pd

    captions = pd.read_parquet(data / "captions")
    assert len(captions) == 16 and captions.key.is_unique and (captions.status == "ok").any()
    assert (data / "heldout_captions" / "_eval.json").is_file()
    assert (data / "runs" / "captioner" / "final" / "config.json").is_file()
    assert all(len(pd.read_parquet(data / "stages" / f"stage{s}.parquet")) > 0 for s in (1, 2, 3))
    assert (data / "runs" / "stage3" / "final" / "state.json").is_file()
    assert (data / "export" / "transformer" / "config.json").is_file()
    assert len(list((data / "samples").glob("*.png"))) == 2
    if any("unicap report" in b.text for b in readme_blocks() if b.mark == "tiny"):
        assert (data / "report.html").stat().st_size > 10_000
