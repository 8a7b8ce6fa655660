"""The data contract: one module per table every job writes and every reader imports.

- `caption`   the caption record (captions/{shard}.parquet; the synthetic answer key)
- `shards`    the image shard: tar + Parquet index + stats file (the input of every job)
- `scores`    score files (scores/{shard}.parquet) and CLIP embeddings (scores/_embeddings/)
- `dedup`     the duplicates table (scores/_dedup/duplicates.parquet)
- `manifest`  the stage manifests (stages/stage{1,2,3}.parquet)
- `checkpoint`, `packed`  the trainer's checkpoint metadata and packed training shards

Each defines its Arrow schema once and a `validate` that raises `base.SchemaError` (a ValueError)
naming every problem it finds. It is the bottom layer: besides pyarrow it imports only itself and
unicap's leaf utilities (unicap.atomic, unicap.config); tests/test_layering.py keeps it so.
"""
