"""What every offline tiny-model builder shares: a build-once cache and a byte-level BPE tokenizer.

Nothing can be downloaded on the build machines, so tests and the offline demo build tiny, randomly
initialised models of the real architectures locally, once, and load them through exactly the code
path a real model id or local folder takes. Each builder sits beside the loader of its kind:

- `unicap.tiny_vlm.tiny_qwen2vl()`     the captioning VLM (loaded by unicap.engines)
- `unicap.clip.tiny_clip()`, `tiny_aesthetic_head()`   open_clip and the aesthetic head (unicap.clip)
- `train.tiny_codecs.tiny_gemma2()`, `tiny_flux_vae()` the trainer's text encoder and VAE (train.codecs)

Each build names its folder with its own version stamp: bump it when the build changes, and the next
run builds afresh instead of loading a stale folder. Cache: $UNICAP_CACHE/models (default ./.cache/models).

Trained tiny models (the captioner, the VAE, CLIP, whose text tower is the CPU stages' text encoder) take minutes
to train on 2 cores, so they ship with the repository: `make tiny-models` (pipelines.tiny_models) trains each
from its recipe and copies its folder to models/ under the same name. `find` and `cached` take a folder from
models/ before the cache; since the name carries the recipe's hash, a changed recipe finds no shipped folder and
trains a new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

DONE_MARK = "unicap_tiny.json"  # written last by every builder: its presence marks a complete folder
SHIPPED = Path(__file__).resolve().parents[1] / "models"  # trained tiny models committed with the repository


def cache_root() -> Path:
    return Path(os.environ.get("UNICAP_CACHE", Path.cwd() / ".cache")) / "models"


def find(name: str, root: Path | None = None) -> Path | None:
    """The complete folder `name`: shipped in models/ (unless a root is given), else in the cache; None if neither."""
    for path in ([] if root else [SHIPPED / name]) + [(root or cache_root()) / name]:
        if (path / DONE_MARK).exists():
            return path
    return None


def cached(name: str, build: Callable[[Path], None], root: Path | None = None) -> Path:
    """The folder `name`: shipped in models/ (unless a root is given), else under the cache, built there by
    `build(tmp_folder)` on first use.

    Atomic: the build goes to a temporary folder renamed into place, so a killed build leaves nothing that
    looks complete. One builder per machine: concurrent callers (two ranks, a demo beside a test) wait on a
    file lock and find the folder built, instead of each training the same model."""
    if found := find(name, root):
        return found
    path = (root or cache_root()) / name
    if distributed_rank() != 0:
        # transformers (5.x) save_pretrained writes nothing on a rank other than 0 once torch.distributed is up:
        # a build there would look complete and hold no weights. Rank 0 builds; the others wait for its folder
        # (without the lock: holding it here would block rank 0 forever).
        return _wait_for(path)
    with _file_lock(path):
        if not (path / DONE_MARK).exists():  # built by the holder before us
            _build_into(path, build)
    return path


def _build_into(path: Path, build: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            if not (path / DONE_MARK).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(folder: Path):
    """An exclusive lock on this machine named after `folder`; the lock file lives in the temp dir, so the
    cache holds only built folders."""
    import fcntl
    import hashlib
    import tempfile

    locks = Path(tempfile.gettempdir()) / "unicap-build-locks"
    locks.mkdir(exist_ok=True)
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    with open(locks / f"{folder.name}-{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def distributed_rank() -> int:
    """This process's rank in an initialised torch.distributed group, else 0 (torch is not imported for it)."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _wait_for(path: Path, timeout_s: float = 3600.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not (path / DONE_MARK).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {distributed_rank()}: waited {timeout_s:.0f}s for rank 0 to build {path}")
        time.sleep(0.5)
    return path


def recipe_tag(version: str, recipe) -> str:
    """A frozen-dataclass recipe's cache key: its fields and the build's version, hashed (the folder name's tail)."""
    import dataclasses
    import hashlib
    import json

    text = json.dumps({"version": version, **dataclasses.asdict(recipe)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def recipe_overrides(recipe, overrides: Iterable[str]):
    """`key=value` overrides of a frozen-dataclass recipe, values parsed as JSON (steps=200, sizes=[16,32])."""
    import dataclasses
    import json

    fields = {f.name for f in dataclasses.fields(recipe)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"override {item!r}: key=value with key one of {sorted(fields)}")
        v = json.loads(value)
        changes[key] = tuple(v) if isinstance(v, list) else v
    return dataclasses.replace(recipe, **changes)


def train_bpe(corpus: Iterable[str], special_tokens: list[str], vocab_size: int = 1024):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `corpus` (every byte encodable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    return tok
