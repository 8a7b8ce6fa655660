"""The captioner's run folder on a local disk or behind a URI (run.out = s3://bucket/runs/captioner), and model
folders read from a URI (`unicap caption --model s3://bucket/runs/captioner/final`).

train.run_store keeps the Next-DiT trainer's run folder; the captioner reuses it as it is for everything but two
differences:

    run.out                 the run folder itself (the Next-DiT trainer's is run.out/<stage>): a RunStore with no
                            stage below run.out, working copy $UNICAP_CACHE/runs/<hash of the URI>
    checkpoints/step-N/     the same layout and commit object as the Next-DiT trainer's (state.json, written
                            last locally, uploaded last): RunStore publishes, prunes and resumes them unchanged
    final/                  a model folder vLLM loads, with no state.json: its commit object is
                            unicap_captioner.json (train.captioner.export writes it last; its presence marks the
                            folder complete, locally and in a bucket). Uploaded here, that file last.

`local_model(uri)` downloads such a model folder (or any folder, given its commit file) into
$UNICAP_CACHE/weights/<hash of the URI>/<name>, once per committed content: what `unicap caption --model URI`
hands vLLM, which loads local folders.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from train import run_store
from train.captioner.export import PROVENANCE_FILE
from unicap import storage
from unicap.storage import Location

FINAL_DIR = "final"


class CaptionerRunStore(run_store.RunStore):
    """Where a captioner run writes (`local`) and, when run.out is a URI, where rank 0 publishes it (`remote`)."""

    def __init__(self, out: str):
        super().__init__(out, "")  # no stage: run.out is the run folder (Location.join and Path / "" keep it)

    def final_provenance(self) -> dict | None:
        """unicap_captioner.json of the run's complete final/ (in the bucket for a URI run.out), or None."""
        marker = self.run_dir_join(FINAL_DIR, PROVENANCE_FILE)
        return json.loads(marker.read_bytes()) if marker.is_file() else None

    def publish_final(self) -> None:
        """The logs, then final/ with unicap_captioner.json last (rank 0; a no-op for a local run folder)."""
        if self.remote is None:
            return
        self.publish_logs()
        upload(self.local / FINAL_DIR, self.remote.join(FINAL_DIR), commit=PROVENANCE_FILE)


# ---------------------------------------------------------------- model folders (commit file: any name)


def upload(local: Path, remote: Location, commit: str) -> None:
    """A local model folder to `remote`, its `commit` file last (train.run_store.upload)."""
    run_store.upload(local, remote, commit)


def download(remote: Location, dest: Path, commit: str) -> Path:
    """A complete folder in a bucket (recursively) into `dest`, renamed into place when complete; a no-op when
    `dest` already holds the same commit file. Several processes of a node may call it at once (the caption job's
    actors): a loser of the race finds the winner's folder and keeps it."""
    marker = remote.join(commit)
    if not marker.is_file():
        raise storage.StorageError(f"{remote.uri} is not a complete model folder: no {commit}")
    committed = marker.read_bytes()
    if _holds(dest, commit, committed):
        return dest
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for f in remote.files(recursive=True):
            name = f.path[len(remote.path) :].strip("/")
            if name != commit:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f.path, str(tmp / name), remote.fs, pafs.LocalFileSystem())
        (tmp / commit).write_bytes(committed)  # the content the files were committed with
        if dest.exists() and not _holds(dest, commit, committed):  # an older commit: set aside, then removed
            stale = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            dest.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:  # another process of this node renamed its copy into place first
            if not _holds(dest, commit, committed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def local_model(path: str | os.PathLike | Location, commit: str = PROVENANCE_FILE) -> Path:
    """A model folder vLLM and transformers can load: a local path as it is; a URI (a captioner's final/, whose
    commit file is unicap_captioner.json) downloaded once per committed content into
    $UNICAP_CACHE/weights/<hash of the URI>/<name>."""
    if not run_store.is_uri(path):
        return Path(path)
    remote = storage.resolve(path)
    dest = run_store.cache_root() / "weights" / run_store._key(remote.uri) / (remote.name or "model")
    return download(remote, dest, commit)


def _holds(folder: Path, commit: str, committed: bytes) -> bool:
    return (folder / commit).is_file() and (folder / commit).read_bytes() == committed
