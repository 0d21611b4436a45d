"""The captioner families prep runs, read from a model's config (`model_type`), and what
`--caption-prompt` means for each (transforms/caption.py runs them).

| family | model_type | prompt is | default prompt | padding |
| --- | --- | --- | --- | --- |
| BLIP | `blip` | a text prefix the caption continues | none | right |
| BLIP-2 | `blip-2` | a text prefix (or a question) | none | left |
| PaliGemma (2) | `paligemma` | the task prefix | `caption en` | left |
| Florence-2 | `florence2` | a task token | `<MORE_DETAILED_CAPTION>` | right |
| Qwen2-VL, Qwen2.5-VL | `qwen2_vl`, `qwen2_5_vl` | the user's instruction, in the chat template | DEFAULT_INSTRUCTION | left |
| SmolVLM, Idefics3 | `smolvlm`, `idefics3` | the instruction, in the chat template | DEFAULT_INSTRUCTION | left |
| LLaVA-OneVision | `llava_onevision` | the instruction, in the chat template | DEFAULT_INSTRUCTION | left |

Decoder-only families generate the prompt then the answer: the caption is the new tokens only
(never the template or the instruction). Generation is greedy (deterministic).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

DEFAULT_INSTRUCTION = "Describe the main subject of this image in one sentence."
PREFIX, TASK, INSTRUCTION = "prefix", "task", "instruction"


class UnsupportedCaptioner(ValueError):
    """A caption model whose family prep does not run; the message names the supported ones."""


@dataclass(frozen=True)
class Family:
    name: str  # shown to people
    model_types: tuple[str, ...]
    prompt_is: str  # PREFIX, TASK or INSTRUCTION
    default_prompt: Optional[str]
    padding_side: str  # of the tokenizer, for batched generation
    # BLIP/BLIP-2: fixed shapes, the prefix echoed in the caption, and the image processor alone
    # where that is the processor's output; the others (image tokens per image size, tiles, chat
    # templates) run the full processor per image with their text, padded when collated.
    per_element: bool = False
    nested_images: bool = False  # the processor takes images as one list per text (Idefics3's)
    image_token_first: bool = False  # the prompt starts with the processor's image token (PaliGemma's)

    @property
    def chat(self) -> bool:
        return self.prompt_is == INSTRUCTION

    @property
    def key(self) -> str:
        return self.model_types[0]


FAMILIES = (
    Family("BLIP", ("blip",), PREFIX, None, "right", per_element=True),
    Family("BLIP-2", ("blip-2", "blip_2"), PREFIX, None, "left", per_element=True),
    Family("PaliGemma", ("paligemma",), PREFIX, "caption en", "left", image_token_first=True),
    Family("Florence-2", ("florence2",), TASK, "<MORE_DETAILED_CAPTION>", "right"),
    Family("Qwen2-VL", ("qwen2_vl", "qwen2_5_vl"), INSTRUCTION, DEFAULT_INSTRUCTION, "left"),
    Family("SmolVLM", ("smolvlm", "idefics3"), INSTRUCTION, DEFAULT_INSTRUCTION, "left", nested_images=True),
    Family("LLaVA-OneVision", ("llava_onevision",), INSTRUCTION, DEFAULT_INSTRUCTION, "left"),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family_of(model_type: Optional[str]) -> Family:
    family = _BY_TYPE.get(model_type or "")
    if family is None:
        raise UnsupportedCaptioner(f"caption model type {model_type!r} is not one prep runs; supported: {supported()}")
    return family


def read_model_type(model: str) -> Optional[str]:
    """The `model_type` in a local model folder's config.json, or in the Hugging Face cache's
    copy of a hub id's (no download); None when neither is on disk."""
    path = os.path.join(os.path.expanduser(model), "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # noqa: BLE001 - not a hub id, or no cache: unknown until loaded
            cached = None
        if not isinstance(cached, str):
            return None
        path = cached
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


def has_chat_template(folder: str) -> bool:
    """Whether a saved processor or tokenizer carries a chat template: transformers 5's
    chat_template.jinja, the older chat_template.json, or a `chat_template` key in
    tokenizer_config.json / processor_config.json."""
    if any(os.path.isfile(os.path.join(folder, name)) for name in ("chat_template.jinja", "chat_template.json")):
        return True
    for name in ("tokenizer_config.json", "processor_config.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                if json.load(f).get("chat_template"):
                    return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def effective_prompt(family: Family, prompt: Optional[str]) -> Optional[str]:
    """What the family is given: the user's prompt, else the family's default."""
    return prompt if prompt else family.default_prompt


def prompt_text(family: Family, processor, prompt: Optional[str]) -> Optional[str]:
    """The text the processor gets with each image: the chat template around the instruction,
    the prefix (after the image token where the family wants it there) or the task token;
    None for BLIP / BLIP-2 without a prompt."""
    used = effective_prompt(family, prompt)
    if family.chat:
        return chat_text(processor, used)
    if family.image_token_first:
        return f"{getattr(processor, 'image_token', '<image>')}{used or ''}"
    return used or None


def chat_text(processor, instruction: str) -> str:
    """The processor's chat template around one image and the instruction, ready to generate."""
    template = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                   "chat_template", None)
    if not template:
        raise UnsupportedCaptioner("this chat model's processor has no chat template: an instruction cannot be "
                                   "placed (save the processor with its chat_template)")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
