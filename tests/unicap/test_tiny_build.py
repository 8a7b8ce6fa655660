"""unicap.tiny_build.cached inside a distributed job: the folder every rank gets holds the weights.

transformers 5's save_pretrained writes nothing on a rank other than 0 once torch.distributed is initialised,
so a tiny model built by rank 1 (two DeepSpeed ranks meeting an empty cache) looked complete and held no weights;
every later run then failed with "Unrecognized model". Rank 0's build is made slow here, so without the guard
rank 1 would finish first and publish its empty folder.
"""

import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

SCRIPT = """
import sys, time
from pathlib import Path
import torch.distributed as dist
from transformers import Gemma2Config, Gemma2Model
from unicap.tiny_build import DONE_MARK, cached

dist.init_process_group("gloo")
rank = dist.get_rank()

def build(out):
    if rank == 0:
        time.sleep(3)  # rank 1 would win the race to publish its folder
    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    Gemma2Model(cfg).save_pretrained(out, safe_serialization=True)
    (out / DONE_MARK).write_text("{}")

path = cached("rank-race", build, Path(sys.argv[1]))
names = sorted(p.name for p in path.iterdir())
assert "config.json" in names and "model.safetensors" in names, (rank, names)
Gemma2Model.from_pretrained(path)
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank} ok")
"""


def test_two_ranks_get_a_complete_folder(tmp_path):
    script = tmp_path / "race.py"
    script.write_text(SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd = [str(torchrun), "--nproc_per_node", "2", *rendezvous, str(script), str(tmp_path / "cache")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "rank 0 ok" in r.stdout and "rank 1 ok" in r.stdout
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["rank-race"]  # no temp folders left


BUILD_ONCE = """
import sys, time
from pathlib import Path
from unicap.tiny_build import DONE_MARK, cached

root = Path(sys.argv[1])

def build(out):
    with open(root / "builds.log", "a") as f:
        f.write("built\\n")
    time.sleep(2)  # long enough that the other process arrives while this one builds
    (out / DONE_MARK).write_text("{}")

print(cached("built-once", build, root))
"""


def test_concurrent_processes_build_once(tmp_path):
    """Two processes (a demo beside a test, outside any process group) meet an empty cache: one builds, the
    other waits on the lock and gets the same folder instead of training the same model a second time."""
    cmd = [sys.executable, "-c", BUILD_ONCE, str(tmp_path)]
    repo = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=repo) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(tmp_path / "built-once")
    assert (tmp_path / "builds.log").read_text().splitlines() == ["built"]
