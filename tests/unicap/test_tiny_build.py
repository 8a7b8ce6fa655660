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
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), str(tmp_path / "cache")]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2]
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "rank 0 ok" in r.stdout and "rank 1 ok" in r.stdout
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["rank-race"]  # no temp folders left
