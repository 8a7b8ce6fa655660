import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datagen.hostile_data import tar_members, write_tar
from datagen.shards import ShardItem, write_shard
from pipelines.runner import IncompleteJobError, ShardJob, run_sharded, summarise
from tests.conftest import snapshot
from unicap.contract.shards import index_path, tar_path
from unicap.decode import decode_image
from unicap.runtime import cpu_threads_per_actor

SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("shard", pa.string()), pa.field("threads", pa.int32())])


def count_rows(table: pa.Table) -> dict:
    return {"rows": table.num_rows}


class ThreadsStage:
    """Reports the compute threads torch has inside the actor."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        threads = pa.array([torch.get_num_threads()] * batch.num_rows, pa.int32())
        return pa.table({"key": batch.column("key"), "shard": batch.column("shard"), "threads": threads})


def test_cpu_actors_get_their_share_of_the_cores(ray_local, synth_shards, tmp_path):
    """Ray sets OMP_NUM_THREADS to an actor's num_cpus (1 for 0.5): CPU inference ran on one thread
    until the runner passed the actor its share of the cores (caption job 0.76x -> see bench)."""
    # no threads=: the runner's default for a CPU actor
    stage = dict(stage_cls=ThreadsStage, stage_kwargs={}, schema=SCHEMA, num_cpus=0.5)
    job = ShardJob(name="threads", **stage, stats_fn=count_rows, failure_table=lambda f: SCHEMA.empty_table())
    run_sharded(job, synth_shards, tmp_path, batch_size=4, limit_shards=1)
    threads = set(pq.read_table(tmp_path).column("threads").to_pylist())
    assert threads == {max(1, os.cpu_count() or 1)}
    assert cpu_threads_per_actor(2) == max(1, (os.cpu_count() or 1) // 2)


# ---------------------------------------------------------------- hostile shards: every input row exactly once

ROW = pa.schema([pa.field(name, pa.string()) for name in ("key", "shard", "status", "error")])


class DecodeStage:
    """Decodes every image; an image whose bytes start with RAISE raises (a bug that one input triggers)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for it in batch.select(["key", "shard", "image"]).to_pylist():
            if it["image"].startswith(b"RAISE"):
                raise ValueError(f"cannot handle {it['key']}")
            d = decode_image(it["image"])
            status, error = ("ok", None) if d.ok else ("failed", f"undecodable_image: {d.error}")
            rows.append({"key": it["key"], "shard": it["shard"], "status": status, "error": error})
        return pa.Table.from_pylist(rows, schema=ROW)


def failures(records: list[dict]) -> pa.Table:
    rows = [{"key": r["key"], "shard": r["shard"], "status": "failed", "error": r["error"]} for r in records]
    return pa.Table.from_pylist(rows, schema=ROW)


DECODE_JOB = ShardJob(
    name="decode", stage_cls=DecodeStage, stage_kwargs={}, schema=ROW, stats_fn=count_rows, failure_table=failures
)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (70, 70), colour).save(buf, "PNG")
    return buf.getvalue()


def _shard(directory: Path, shard: str, keys: list[str], **images: bytes) -> list[tuple[str, bytes]]:
    items = []
    for i, k in enumerate(keys):
        image = images.get(k, _png((9 * i, 90, 200)))  # a colour of its own, unless the test gives the bytes
        items.append(ShardItem(key=k, source=k, image=image, ext="png", width=70, height=70))
    write_shard(directory, shard, items)
    return tar_members(tar_path(directory, shard))


def outputs(out: Path) -> dict[str, tuple[str, str | None]]:
    t = pq.read_table(out).to_pylist() if list(out.glob("*.parquet")) else []
    assert len({(r["shard"], r["key"]) for r in t}) == len(t)  # nothing twice
    return {r["key"]: (r["status"], r["error"]) for r in t}


def test_a_shard_completes_against_its_index_keys_not_a_row_count(ray_local, tmp_path):
    """A tar sample the index does not list used to count as one of the shard's rows: the shard was
    written before its last real row arrived, and a re-run thought it complete (row lost for good)."""
    data, out = tmp_path / "shards", tmp_path / "out"
    members = _shard(data, "00000", ["a", "b", "c"])
    ghost = [("ghost.png", _png((1, 2, 3))), ("ghost.json", b"{}")]
    write_tar(tar_path(data, "00000"), members[:3] + ghost + members[3:] + [members[0], members[2]])  # and a second "a"
    summary = summarise(out, run_sharded(DECODE_JOB, data, out, batch_size=1))
    assert outputs(out) == {"a": ("ok", None), "b": ("ok", None), "c": ("ok", None)}
    stats = json.loads((out / "_stats" / "00000.json").read_text())
    assert stats["refused_samples"] == 2 and stats["refused_examples"] == ["a/second-sample", "ghost"]
    assert summary["refused_samples"] == 2 and summary["rows"] == 3


def test_a_truncated_tar_keeps_its_rows_and_names_the_missing_keys(ray_local, tmp_path):
    """A cut-off tar failed the whole job, threw away the rows already done, and failed the same way on
    every re-run without naming the keys. Now: the rows before the cut stand, the rest are failed rows."""
    data, out = tmp_path / "shards", tmp_path / "out"
    _shard(data, "00000", ["a", "b"])
    spans = write_tar(tar_path(data, "00001"), _shard(data, "00001", ["c", "d", "e", "f"]))
    inside_e = next(start for name, start, _ in spans if name == "e.png") + 600
    tar_path(data, "00001").write_bytes(tar_path(data, "00001").read_bytes()[:inside_e])  # cut inside e's image
    run_sharded(DECODE_JOB, data, out, batch_size=2)
    got = outputs(out)
    assert {k: s for k, (s, _) in got.items()} == dict.fromkeys("abcd", "ok") | dict.fromkeys("ef", "failed")
    assert got["e"][1].startswith(
        "undecodable_image: missing from tar (00001.tar is truncated or corrupt after 6 members"
    )
    before = snapshot(out)
    run_sharded(DECODE_JOB, data, out, batch_size=2)  # nothing pending: nothing rewritten
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("_")} == {
        k: v for k, v in before.items() if not k.startswith("_")
    }


def test_one_bad_item_costs_only_itself(ray_local, tmp_path):
    """An invalid {key}.json aborted the whole job (json.loads in the reader); an exception in a stage
    on one item failed its whole batch, and the job with it."""
    data, out = tmp_path / "shards", tmp_path / "out"
    members = _shard(data, "00000", ["a", "b", "c", "d"], c=b"RAISE: this input trips a bug")
    write_tar(tar_path(data, "00000"), [(n, b"{not json" if n == "b.json" else d) for n, d in members])
    run_sharded(DECODE_JOB, data, out, batch_size=4)
    got = outputs(out)
    assert got["a"] == ("ok", None) and got["d"] == ("ok", None)
    assert got["b"][0] == "failed" and got["b"][1].startswith("undecodable_image: invalid b.json: Expecting")
    assert got["c"] == ("failed", "processing_error: ValueError: cannot handle c")


@pytest.mark.parametrize("broken", ["tar", "index"])
def test_a_shard_that_fails_as_a_whole_is_named_and_the_job_exits_non_zero(ray_local, tmp_path, broken):
    data, out = tmp_path / "shards", tmp_path / "out"
    for shard, keys in (("00000", ["a"]), ("00001", ["b", "c"]), ("00002", ["d"])):
        _shard(data, shard, keys)
    path = tar_path(data, "00001") if broken == "tar" else index_path(data, "00001")
    saved = path.read_bytes()
    if broken == "tar":  # the tar cannot be opened at all (IsADirectoryError): not the rows' fault, the shard's
        path.unlink()
        path.mkdir()
        why = r"00001: 2 of 2 rows never arrived \(e\.g\. b, c\)"
    else:  # the index is garbage: the shard's keys are unknown
        path.write_bytes(b"not parquet")
        why = r"00001: its expected keys could not be read: ArrowInvalid"
    with pytest.raises(IncompleteJobError, match=rf"1 of 3 shards could not be completed .*{why}"):
        run_sharded(DECODE_JOB, data, out, batch_size=1)
    assert set(outputs(out)) == {"a", "d"}
    summary = json.loads((out / "_summary.json").read_text())
    assert list(summary["failed_shards"]) == ["00001"] and summary["shards"] == 2
    if broken == "tar":
        path.rmdir()
    path.write_bytes(saved)
    run = run_sharded(DECODE_JOB, data, out, batch_size=1)  # fixed: the re-run completes exactly that shard
    assert run["shards_written"] == ["00001"] and set(outputs(out)) == {"a", "b", "c", "d"}
    assert summarise(out, run)["failed_shards"] == {}
