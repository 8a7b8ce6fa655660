"""Helper of test_trainer (run in a fresh process: vLLM's in-process engine): serve a captioner folder with
vLLM and with transformers and compare prompts and greedy captions."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

COLUMNS = ("caption_short_en", "caption_tags_zh", "caption_medium_en")


def compare(folder: str, handful: str, max_pixels: int) -> dict:
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration
    from vllm import SamplingParams

    from train.captioner.data import ChatEncoder, FolderSource
    from unicap import prompts
    from unicap.engines import EngineConfig, GenRequest, VLLMEngine

    truth = pd.read_parquet(Path(handful) / "truth").set_index("key")
    source = FolderSource(Path(handful) / "truth", handful, max_pixels=max_pixels)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = ChatEncoder(tokenizer, AutoImageProcessor.from_pretrained(folder, max_pixels=max_pixels))
    gen = json.loads((Path(folder) / "generation_config.json").read_text())
    sampling = sorted(k for k in ("temperature", "top_p", "top_k", "do_sample", "repetition_penalty") if k in gen)
    engine = VLLMEngine(EngineConfig(model=folder, max_pixels=max_pixels, kv_cache_bytes=64 << 20))
    hf = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    by_name = {p.fields[0]: p for p in prompts.direct_prompts(["long", "medium", "short", "tags"], ["en", "zh"])}
    out, prompt_ids_equal = [], True
    for i in range(len(source)):
        sample = source.sample(i)
        pixel_values, grid = encoder.pixels(sample.image)
        for col in COLUMNS:
            msgs = prompts.chat_messages(by_name[col], "placeholder")
            result = engine.generate([GenRequest(msgs, sample.image, 48)])[0]
            # the prompt vLLM ran is the one the trainer built
            conv = _with_pil_image(msgs, sample.image)
            request = engine.llm.chat([conv], SamplingParams(max_tokens=1), use_tqdm=False)[0]
            prompt_ids_equal &= list(request.prompt_token_ids) == encoder.request_ids(col, grid)
            ids = torch.tensor([encoder.request_ids(col, grid)])
            mm = (ids == hf.config.image_token_id).int()
            image = {"pixel_values": pixel_values, "image_grid_thw": torch.tensor([grid]), "mm_token_type_ids": mm}
            with torch.no_grad():
                g = hf.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **image, max_new_tokens=48, do_sample=False
                )
            text = tokenizer.decode(g[0, ids.shape[1] :], skip_special_tokens=True)
            row = {"key": sample.key, "column": col, "vllm": result.text, "hf": text}
            out.append({**row, "finish_reason": result.finish_reason, "truth": truth.loc[sample.key, col]})
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = {"eos_is_end_of_turn": gen.get("eos_token_id") == eos, "sampling_keys": sampling}
    return {"captions": out, "prompt_ids_equal": prompt_ids_equal, "generation_config": config}


def _with_pil_image(messages: list[dict], image) -> list[dict]:
    """The chat messages with each image_url part replaced by the PIL image itself (what vLLM's chat takes)."""

    def part(c: dict) -> dict:
        return {"type": "image_pil", "image_pil": image} if c.get("type") == "image_url" else c

    return [
        {**m, "content": [part(c) for c in m["content"]]} if isinstance(m["content"], list) else m for m in messages
    ]
