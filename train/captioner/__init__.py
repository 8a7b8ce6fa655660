"""UniCap fine-tuning: a Qwen2-VL-family model taught to answer the captioning job's own prompts.

config.py      CaptionerConfig (YAML + key=value overrides), the DeepSpeed config derived from it
base.py        the starting model: a local folder / hub id, or a tiny one built offline
data.py        samples (on-the-fly synthetic scenes, or a caption folder + its image shards) -> chat turns
model.py       the packed forward (vision tower once per image), the loss, grounding heads
checkpoint.py  checkpoints saved and loaded (safetensors + JSON state); TrainingError
trainer.py     the DeepSpeed loop and resume; `unicap train-captioner`
export.py      the output folder vLLM and transformers load as they are
"""
