"""`unicap validate` on a bucket against the same folder on disk (moto's S3 server)."""

from unicap import storage
from unicap.cli import main as unicap

pytest_plugins = ["tests.s3_server"]


def test_validate_reads_caption_folders_from_a_bucket(s3, tmp_path, capsys):
    assert unicap(["synth", "--out", str(tmp_path / "synth"), "--n", "6", "--shard-size", "3"]) == 0
    truth = tmp_path / "synth" / "truth"
    for f in sorted(truth.iterdir()):
        storage.resolve(f"{s3}/captions/{f.name}").write_bytes(f.read_bytes())
    capsys.readouterr()
    assert unicap(["validate", str(truth)]) == 0
    here = capsys.readouterr().out
    assert unicap(["validate", f"{s3}/captions"]) == 0
    there = capsys.readouterr().out
    assert there == here and "2/2 files valid, 6 rows" in there
    assert unicap(["validate", f"{s3}/captions/00001.parquet"]) == 0
    storage.resolve(f"{s3}/captions/broken.parquet").write_bytes((tmp_path / "synth" / "00000.parquet").read_bytes())
    assert unicap(["validate", f"{s3}/captions"]) == 1
    assert f"INVALID {s3}/captions/broken.parquet" in capsys.readouterr().out


def test_validate_with_a_missing_bucket_is_one_line(s3, capsys):
    assert unicap(["validate", f"{s3}-missing/captions"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{s3[5:]}-missing' does not exist" in err
