"""The text Lumina-Image 2.0's Gemma-2 encodes: system prompt + " <Prompt Start> " + caption.

Its own module so that the codecs (train.codecs) and the tiny text encoder's tokenizer build (train.tiny_codecs,
which learns these words) share one definition without importing each other.
"""

SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts."
)
PROMPT_START = " <Prompt Start> "


def format_prompt(caption: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    return f"{system_prompt}{PROMPT_START}{caption}"
