"""The trained captioner as a model folder that vLLM and transformers load as they are.

    unicap caption --input SHARDS --output DIR --model RUN/final

Contents: config.json + model.safetensors (the base's architecture, the trained weights, `dtype`), the base's
tokenizer and chat template, its image processor config (preprocessor_config.json), a generation_config.json
whose eos_token_id is the end-of-turn token <|im_end|> and that sets no sampling defaults (vLLM adopts a
model's generation config: a base's temperature / top_p would silently replace greedy decoding), and
unicap_captioner.json (how it was trained). Written under a hidden name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch

PROVENANCE_FILE = "unicap_captioner.json"
END_OF_TURN = "<|im_end|>"


def generation_config(tokenizer):
    """Greedy-neutral generation defaults: stop at the end of the turn, pad with the pad token, nothing else."""
    from transformers import GenerationConfig

    eos = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eos is None or eos == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {END_OF_TURN} token: not a Qwen2-VL-family chat tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id)


def export_folder(
    base: str, weights: dict[str, torch.Tensor], out: str | Path, provenance: dict, dtype: str = "bfloat16"
) -> Path:
    """Write the folder `out` from the base model folder / hub id and trained weights (HF parameter names)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        config = AutoConfig.from_pretrained(base)
        model = AutoModelForImageTextToText.from_config(config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
        if missing or unexpected:
            raise ValueError(f"trained weights do not fit {base}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model = model.to(getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(base)
        model.generation_config = generation_config(tokenizer)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        AutoImageProcessor.from_pretrained(base).save_pretrained(tmp)
        local = Path(base)
        for name in ("chat_template.jinja", "chat_template.json"):
            if (local / name).is_file():
                shutil.copy(local / name, tmp / name)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, sort_keys=True, default=str))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
