"""The trainer's run folder on a local disk or behind a URI (run.out = s3://bucket/runs), and weights folders
read from a URI (`unicap sample --ckpt s3://...`, train.convert, `unicap adherence --weights`).

A local run.out is the run folder itself: nothing here copies anything. With a URI the nodes share no disk,
so each node trains in a local working copy, $UNICAP_CACHE/runs/<hash of the URI>/<stage> (default
./.cache), and rank 0 publishes it:

    checkpoint step-N    its tensors, then the logs, then its state.json LAST: state.json is the commit object
                         (unicap.contract.checkpoint reads a bucket by that rule); then keep_last prunes the
                         bucket's older step folders (state.json first, so a half-deleted one never counts)
    final/               the same at the end (the diffusers export with it), then the logs
    logs                 config.yaml (also at start-up), metrics.jsonl, samples/, tb/ (changed files only)

Uploads stream from the local files (multipart on S3: an object exists only once complete). On start every
node's local rank 0 empties the working copy of checkpoints, downloads the bucket's latest complete checkpoint
and metrics.jsonl into it, then all ranks meet at a barrier and load from the local copy as from a local run
(train.checkpoint reads safetensors on every rank). A previous stage's final/ or an explicit init_from in a
bucket is downloaded the same way into $UNICAP_CACHE/weights/<hash>, reused while its state.json is unchanged.
The keys/ audit logs (run.log_keys) stay in the working copies.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from unicap import distributed, storage
from unicap.contract import checkpoint as contract
from unicap.storage import Location

# tests only (tests/train/test_trainer.py, kill -9 of every rank mid-save): the upload of the folder this names, e.g.
# step-00000004, stops between its files and its commit file, where the test kills the job. Unset in real runs.
PAUSE_BEFORE_COMMIT = "UNICAP_TEST_PAUSE_BEFORE_COMMIT"
PAUSE_S = 600.0

LOG_FILES = ("config.yaml", "metrics.jsonl")
LOG_DIRS = ("samples", "tb")

Folder = Path | Location  # a checkpoint / final folder: local, or in a bucket


def cache_root() -> Path:
    return Path(os.environ.get("UNICAP_CACHE") or Path.cwd() / ".cache").absolute()  # pyarrow wants absolute paths


def is_uri(path: str | os.PathLike | Location) -> bool:
    """True for an object-store (or other non-local) URI; a local path or file:// is not one."""
    if isinstance(path, Location):
        return not path.is_local
    return "://" in str(path) and not str(path).lower().startswith("file://")


def folder(path: str | os.PathLike | Location) -> Folder:
    """A user's weights folder as a Path (local) or a Location (URI)."""
    return storage.resolve(path) if is_uri(path) else Path(path)


def describe(where: Folder) -> str:
    return where.uri if isinstance(where, Location) else str(Path(where).resolve())


def has_state(where: Folder) -> bool:
    state = where.join(contract.STATE_FILE) if isinstance(where, Location) else where / contract.STATE_FILE
    return state.is_file()


def stage_final(out: str, stage: str) -> Folder:
    """A stage's final/ folder under run.out (local or URI)."""
    return RunStore(out, stage).run_dir_join(contract.FINAL_DIR)


def _key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- moving folders


def download(remote: Location, dest: Path) -> Path:
    """The top-level files of a complete weights folder in a bucket into `dest` (replaced whole, renamed into
    place when complete); a no-op when `dest` already holds the same state.json."""
    state = remote.join(contract.STATE_FILE)
    if not state.is_file():
        raise contract.CheckpointError(f"{remote.uri} is not a complete checkpoint: no {contract.STATE_FILE}")
    committed = state.read_bytes()
    if (dest / contract.STATE_FILE).is_file() and (dest / contract.STATE_FILE).read_bytes() == committed:
        return dest
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for f in remote.files():
            if f.name != contract.STATE_FILE:
                pafs.copy_files(f.path, str(tmp / f.name), remote.fs, pafs.LocalFileSystem())
        (tmp / contract.STATE_FILE).write_bytes(committed)  # the state the tensors were committed with
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def upload(local: Path, remote: Location, commit: str = contract.STATE_FILE) -> None:
    """A local checkpoint / final / model folder (recursively) to `remote`, its `commit` file last (a checkpoint's
    state.json). A folder already there (a re-save of the same step) is un-committed first: its commit file goes,
    then the files we do not have."""
    remote.join(commit).delete()
    ours = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and not _hidden(p, local)}
    if commit not in ours:
        raise FileNotFoundError(f"{local} is not complete: no {commit}")
    for old in remote.files(recursive=True):
        if old.path[len(remote.path) :].strip("/") not in ours:
            old.delete()
    for name in sorted(ours - {commit}):
        _put(local / name, remote.join(name))
    if os.environ.get(PAUSE_BEFORE_COMMIT) == remote.name:
        time.sleep(PAUSE_S)  # tests only (PAUSE_BEFORE_COMMIT): the files are up, the folder not yet committed
    _put(local / commit, remote.join(commit))


def _put(src: Path, dst: Location) -> None:
    pafs.copy_files(str(src), dst.path, pafs.LocalFileSystem(), dst.fs)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _delete_folder(remote: Location) -> None:
    """A step folder in a bucket: its state.json first (it stops counting at once), then the rest."""
    remote.join(contract.STATE_FILE).delete()
    try:
        remote.fs.delete_dir(remote.path)
    except FileNotFoundError:
        pass


def local_weights(path: str | os.PathLike | Location) -> Path:
    """A weights folder to read with train.checkpoint: a local path as it is; a URI downloaded (once per
    committed state.json) into $UNICAP_CACHE/weights/<hash of the URI>."""
    if not is_uri(path):
        return Path(path)
    remote = storage.resolve(path)
    return download(remote, cache_root() / "weights" / _key(remote.uri) / (remote.name or "weights"))


# ---------------------------------------------------------------- the run folder


class RunStore:
    """Where a run writes (`local`) and, when run.out is a URI, where rank 0 publishes it (`remote`)."""

    def __init__(self, out: str, stage: str):
        self.remote = storage.resolve(out).join(stage) if is_uri(out) else None
        self.local = cache_root() / "runs" / _key(self.remote.uri) / stage if self.remote else Path(out) / stage
        self.published: dict[str, tuple[int, int]] = {}  # log file -> (size, mtime_ns) uploaded
        self.flush_before_publish: list = []  # e.g. the TensorBoard writer's flush

    @property
    def run_dir(self) -> Folder:
        """The run folder as users name it: the URI, or the local folder."""
        return self.remote if self.remote is not None else self.local

    def run_dir_join(self, *parts: str) -> Folder:
        return self.remote.join(*parts) if self.remote is not None else self.local.joinpath(*parts)

    def show(self, local: Path) -> str:
        """The user's name for a file or folder of the working copy."""
        if self.remote is None:
            return str(local)
        return self.remote.join(local.relative_to(self.local).as_posix()).uri

    def check_writable(self) -> None:
        if self.remote is not None:
            storage.check_writable(self.remote)

    def final_state(self) -> dict | None:
        """The state.json of the run's committed final/, or None."""
        final = self.run_dir_join(contract.FINAL_DIR)
        return contract.read_state(final) if has_state(final) else None

    def fetch(self, resume: Folder | None, init: Folder | None) -> tuple[Path | None, Path | None]:
        """Local copies of the resume checkpoint and the initial weights (collective: each node's local rank 0
        downloads, everyone waits). With a URI run folder the working copy is reset to the bucket first, and
        the checkpoint to resume lands in it (pruned like the run's own); other weights in the weights cache."""
        remote_parts = self.remote is not None or isinstance(resume, Location) or isinstance(init, Location)
        if not remote_parts:
            return resume, init
        in_run = self.remote is not None and isinstance(resume, Location)  # resume into the working copy
        if distributed.local_rank() == 0:
            if self.remote is not None:
                self._reset_working_copy(resume)
            if in_run:
                download(resume, self.local / contract.CHECKPOINTS_DIR / resume.name)
            for f in (None if in_run else resume, init):
                if isinstance(f, Location):
                    local_weights(f)
        distributed.barrier()
        if isinstance(resume, Location):  # downloaded by this node's local rank 0: found in place
            resume = self.local / contract.CHECKPOINTS_DIR / resume.name if in_run else local_weights(resume)
        if isinstance(init, Location):
            init = local_weights(init)
        return resume, init

    def _reset_working_copy(self, resume: Folder | None) -> None:
        """The bucket is the truth: drop local checkpoints (but the one to resume, if already here) and final/,
        and continue the bucket's metrics.jsonl."""
        keep = resume.name if resume is not None else None
        for old in (self.local / contract.CHECKPOINTS_DIR).glob("*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.local / contract.FINAL_DIR, ignore_errors=True)
        metrics = self.local / "metrics.jsonl"
        metrics.unlink(missing_ok=True)
        remote_metrics = self.remote.join("metrics.jsonl")
        if resume is not None and remote_metrics.is_file():
            self.local.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(remote_metrics.path, str(metrics), remote_metrics.fs, pafs.LocalFileSystem())

    # -- publishing (rank 0; no-ops for a local run folder)

    def publish_checkpoint(self, local: Path, keep_last: int) -> None:
        """Upload a complete local step folder, the logs, then its state.json; prune the bucket to keep_last."""
        if self.remote is None:
            return
        remote = self.remote.join(contract.CHECKPOINTS_DIR, local.name)
        self.publish_logs()  # before the commit: the logs then cover at least the committed steps
        upload(local, remote)
        committed = contract.complete_checkpoints(self.remote)
        for old in committed[:-keep_last]:
            _delete_folder(old)
        names = {c.name for c in committed}
        for stray in self.remote.join(contract.CHECKPOINTS_DIR).listdir():
            if stray not in names:  # an upload killed before its commit: never to be completed
                _delete_folder(self.remote.join(contract.CHECKPOINTS_DIR, stray))

    def publish_final(self) -> None:
        if self.remote is None:
            return
        self.publish_logs()
        upload(self.local / contract.FINAL_DIR, self.remote.join(contract.FINAL_DIR))

    def publish_logs(self) -> None:
        """config.yaml, metrics.jsonl, samples/ and tb/: the files changed since the last publish."""
        if self.remote is None:
            return
        for flush in self.flush_before_publish:
            flush()
        files = [self.local / name for name in LOG_FILES]
        files += [p for d in LOG_DIRS for p in sorted((self.local / d).rglob("*")) if not _hidden(p, self.local)]
        for path in files:
            if not path.is_file():
                continue
            stat = path.stat()
            name = path.relative_to(self.local).as_posix()
            if self.published.get(name) != (stat.st_size, stat.st_mtime_ns):
                _put(path, self.remote.join(name))
                self.published[name] = (stat.st_size, stat.st_mtime_ns)
