"""Caption stage: a Hugging Face image-to-text model via RunInference: BLIP and BLIP-2, and
today's instruction VLMs (PaliGemma, Florence-2, Qwen2-VL, SmolVLM, LLaVA-OneVision); the family
is read from the model's config and decides what the prompt means (transforms/captioners.py).

The model is a hub id (downloaded to the Hugging Face cache when there is a network) or a
local directory saved with `save_pretrained`. Generation is batched and greedy; the caption
is the new tokens only, checked by the guards (transforms/caption_guards.py): a flagged
caption is dropped (a dead letter naming the flag, with the raw text) or kept with its flags
(`on_bad="keep"`); a preamble ("The image shows ...") is trimmed.

The processor (resize, normalise, tokenise the prompt, the chat template) runs per element in
`prepare`, on the handler's thread pool (`infer` collates the parts as its batch call would),
and is loaded in every worker process; the network runs behind `LoadedCaptioner.generate`, a
method, so that in Beam's large-model mode (one copy per machine in a server process,
`--caption-model-copies`) the workers call it through the proxy Beam hands them (a proxy
exposes methods only, not attributes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from prep.device import resolve_device
from prep.models.locate import hf_hub_cache
from prep.schemas.records import DeadLetterKind, Sample
from prep.transforms import caption_guards as guards
from prep.transforms import captioners
from prep.transforms.captioners import (
    Family,
    effective_prompt,
    family_of,
    read_model_type,
)
from prep.transforms.decode import load_rgb
from prep.transforms.inference import LAZY_LOCK, ModelUnavailable, Reject, StageHandler
from prep.transforms.options import CaptionOptions

STAGE = "caption"
_WS = re.compile(r"\s+")


def clean_caption(text: str, prompt: Optional[str] = None) -> str:
    """Strip, collapse whitespace, and drop an echoed prompt at the start."""
    text = _WS.sub(" ", text or "").strip()
    if prompt:
        p = _WS.sub(" ", prompt).strip()
        if p and text.lower().startswith(p.lower()):
            text = text[len(p):].strip()
    return text


def _hf_unavailable(model: str, exc: Exception) -> ModelUnavailable:
    cache = hf_hub_cache()  # where the preflight looked too (prep.models.locate.locate_caption_model)
    if os.path.isdir(model) or model.startswith((".", "/")):
        how = f"the directory {model!r} must hold a model saved with save_pretrained (config.json, weights, processor files)"
    else:
        how = (
            f"it is a Hugging Face hub id: with a network it downloads to {cache} (set HF_HOME to move it); "
            f"offline, download it elsewhere (`huggingface-cli download {model}`) and copy the cache, "
            f"or pass --caption-model /path/to/local/dir"
        )
    return ModelUnavailable(f"captioning model {model!r} could not be loaded ({type(exc).__name__}: {exc}); {how}")


def _same_outputs(full: dict, processor, image) -> bool:
    """Whether the processor's outputs for `image` are its image processor's, exactly."""
    import torch

    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return False
    try:
        alone = dict(image_processor(images=[image], return_tensors="pt"))
    except Exception:  # noqa: BLE001 - an image processor that cannot run alone: keep the full call
        return False
    return full.keys() == alone.keys() and all(
        isinstance(full[k], torch.Tensor) and isinstance(alone[k], torch.Tensor) and full[k].dtype == alone[k].dtype
        and torch.equal(full[k], alone[k]) for k in full)


@dataclass
class LoadedCaptioner:  # a class, not a tuple: Beam's Shared keeps a weak reference to it
    processor: Any
    model: Any
    device: str
    dtype: Any

    def generate(self, inputs: dict, **kwargs):
        """Token ids (a CPU tensor) for processor outputs `inputs`; callable through a proxy."""
        import torch

        batch = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            return self.model.generate(**batch, **kwargs).cpu()

    def eos_ids(self) -> list[int]:
        """The ids that end generation (a method: callable through a proxy)."""
        eos = self.model.generation_config.eos_token_id
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@dataclass(frozen=True)
class Flagged:
    """A caption the guards flagged, kept (`on_bad="keep"`): written with its flags."""

    text: str
    flags: tuple[str, ...]


_FLAG_KINDS = {
    guards.EMPTY: DeadLetterKind.EMPTY_CAPTION,
    guards.REPETITION: DeadLetterKind.CAPTION_REPETITION,
    guards.ECHO: DeadLetterKind.CAPTION_ECHO,
    guards.REFUSAL: DeadLetterKind.CAPTION_REFUSAL,
    guards.CUT: DeadLetterKind.CAPTION_CUT,
}


SEQUENCE_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels"}  # (batch, tokens)


def collate(parts: list[dict], pad_token_id: Optional[int], padding_side: str) -> dict:
    """One batch from the processor's outputs for one image each, equal to its call on the whole
    batch with padding (tests/test_captioner_families.py checks it per family, images of
    different sizes): token rows padded to the longest on `padding_side` (input_ids with the
    pad token, the rest with 0); image tensors concatenated, zero-padded first where their
    tiles or patches differ in number (SmolVLM, LLaVA-OneVision); Qwen2-VL's flat patch rows
    simply concatenate."""
    import torch

    batch = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key in SEQUENCE_KEYS:
            width = max(v.shape[1] for v in values)
            if width != min(v.shape[1] for v in values) and key == "input_ids" and pad_token_id is None:
                raise ValueError("the tokenizer has no pad token: prompts of different lengths cannot be batched")
            fill = pad_token_id if key == "input_ids" else 0
            values = [_pad(v, (0, width - v.shape[1]) if padding_side == "right" else (width - v.shape[1], 0), fill)
                      for v in values]
        elif values[0].dim() > 1 and len({tuple(v.shape[1:]) for v in values}) > 1:
            shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
            values = [_pad_to(v, shape) for v in values]
        batch[key] = torch.cat(values)
    return batch


def _pad(row, before_after: tuple[int, int], fill):
    import torch.nn.functional as F

    return F.pad(row, before_after, value=fill) if any(before_after) else row


def _pad_to(value, shape: list[int]):
    """Zeros after the end of every dimension but the first, up to `shape`."""
    import torch.nn.functional as F

    widths = []
    for d in reversed(range(1, value.dim())):
        widths += [0, shape[d - 1] - value.shape[d]]
    return F.pad(value, widths) if any(widths) else value


def new_tokens(out, input_ids):
    """The generated rows without the prompt: decoder-only models return prompt + answer (their
    rows start with input_ids), encoder-decoder ones the answer alone."""
    if input_ids is not None and out.shape[1] >= input_ids.shape[1] and bool((out[:, :input_ids.shape[1]] == input_ids).all()):
        return out[:, input_ids.shape[1]:]
    return out


class CaptionHandler(StageHandler):
    """Batched captioning with any `AutoModelForImageTextToText` model."""

    stage = STAGE

    def __init__(
        self,
        model: str,
        *,
        prompt: Optional[str] = None,
        max_new_tokens: int = CaptionOptions.max_new_tokens,
        num_beams: int = CaptionOptions.num_beams,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        min_batch_size: Optional[int] = None,
        max_batch_size: int = CaptionOptions.batch_size,
        large_model: bool = False,
        model_copies: Optional[int] = None,
        prepare_threads: int = 1,
        on_bad: str = CaptionOptions.on_bad,
    ):
        if on_bad not in ("drop", "keep"):
            raise ValueError(f"on_bad must be drop or keep, got {on_bad!r}")
        super().__init__(
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            large_model=large_model,
            model_copies=model_copies,
            prepare_threads=prepare_threads,
        )
        self.model_id = model
        self.prompt = prompt or None
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.on_bad = on_bad
        self._processor_cache: Any = None
        self._images_only: Optional[bool] = None  # see prepare; decided once per process
        self._family: Optional[Family] = None
        self._text: Optional[str] = None  # the text given with every image (chat template applied)

    def __getstate__(self):
        state = super().__getstate__()
        state["_processor_cache"] = None
        state["_images_only"] = None
        state["_text"] = None
        return state

    def family(self) -> Family:
        """The model's family, from its config (transforms/captioners.py); decided once."""
        if self._family is None:
            model_type = read_model_type(self.model_id)
            if model_type is None:
                from transformers import AutoConfig

                try:
                    model_type = AutoConfig.from_pretrained(self.model_id,
                                                            trust_remote_code=self.trust_remote_code).model_type
                except (OSError, ValueError) as exc:
                    raise _hf_unavailable(self.model_id, exc) from exc
            self._family = family_of(model_type)
        return self._family

    def prompt_text(self) -> Optional[str]:
        """The text the processor gets with each image: the chat template around the
        instruction, or the prefix / task token (None: BLIP without a prompt)."""
        if self._text is None:
            self._text = captioners.prompt_text(self.family(), self.processor(), self.prompt) or ""
        return self._text or None

    def processor(self):
        """This process's processor (loaded once; cheap next to the model)."""
        with LAZY_LOCK:
            if self._processor_cache is None:
                from transformers import AutoProcessor

                try:
                    self._processor_cache = AutoProcessor.from_pretrained(
                        self.model_id, trust_remote_code=self.trust_remote_code)
                except Exception as exc:  # noqa: BLE001 - missing or corrupt files alike: the model is unavailable
                    raise _hf_unavailable(self.model_id, exc) from exc
                tokenizer = getattr(self._processor_cache, "tokenizer", None)
                if tokenizer is not None:  # batched generation: decoder-only families pad on the left
                    tokenizer.padding_side = self.family().padding_side
            return self._processor_cache

    def describe(self) -> dict:
        """For the manifest: the model, its family, the prompt as given and as used, every
        generation parameter, and what happens to a flagged caption."""
        described = {
            "model": self.model_id,
            "prompt": self.prompt,
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "dtype": self.dtype,
        }
        described.update(do_sample=False, on_bad=self.on_bad)
        try:  # from the config on disk only: a hub id not downloaded yet is known once loaded
            family = self._family or family_of(read_model_type(self.model_id))
        except ValueError:
            return described
        described.update(family=family.name, prompt_is=family.prompt_is,
                         prompt_used=effective_prompt(family, self.prompt), padding_side=family.padding_side)
        return described

    def load_model(self):
        import torch
        from transformers import AutoModelForImageTextToText
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        device = resolve_device(self.device)
        dtype = self.dtype
        if dtype == "auto":
            torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
        else:
            torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        processor = self.processor()
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                self.model_id, dtype=torch_dtype, trust_remote_code=self.trust_remote_code
            )
        except Exception as exc:  # noqa: BLE001 - e.g. a truncated safetensors file (SafetensorError)
            raise _hf_unavailable(self.model_id, exc) from exc
        model.to(device).eval()
        return LoadedCaptioner(processor, model, device, torch_dtype)

    def prepare(self, sample: Sample, model):
        """Processor outputs for one image (and the prompt): a dict of tensors with batch 1.

        The processors treat the images of a batch one by one, so concatenating these is
        the batch call's result (tests/test_handlers.py checks it against a direct call).

        Without a prompt, where the processor's output for an image is exactly its image
        processor's (BLIP, BLIP-2: checked on this process's first image, key by key and
        value by value), the image processor is called directly: the processor's own Python
        around it (merging kwargs) was 0.3 ms of 0.7 ms per CelebA image, under the GIL.
        Processors that add anything keep the full call. The other families (PaliGemma,
        Florence-2 and the chat models) run the full processor per image too, with the prompt's
        text (the chat template around the instruction): `infer` collates the parts, padding
        token rows and tiles as the processor's batch call does (`collate`). On the pool, that
        is the processor's work in parallel; on the model's thread it was the stage's bound
        for a chat family (bench.ceiling --caption-family qwen2_vl, web size: 30 img/s of 79)."""
        image = load_rgb(sample.image_jpeg)
        processor = self.processor()
        family = self.family()
        if not family.per_element:
            text = self.prompt_text()
            return dict(processor(images=[[image] if family.nested_images else image],
                                  **({"text": [text]} if text else {}), return_tensors="pt"))
        if self.prompt:
            return dict(processor(images=[image], text=[self.prompt], return_tensors="pt"))
        if self._images_only:
            return dict(processor.image_processor(images=[image], return_tensors="pt"))
        full = dict(processor(images=[image], return_tensors="pt"))
        if self._images_only is None:
            self._images_only = _same_outputs(full, processor, image)
        return full

    def infer(self, prepared: list, model) -> list:
        """One generate call; per element its new token ids and whether generation ran to the
        token limit without ending (decoded and checked in `finish`, on the pool)."""
        tokenizer = getattr(self.processor(), "tokenizer", None)
        inputs = collate(prepared, getattr(tokenizer, "pad_token_id", None), self.family().padding_side)
        out = model.generate(inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False)
        rows = new_tokens(out, inputs.get("input_ids"))
        eos = model.eos_ids()
        ended = [bool(eos) and any(int(t) in eos for t in row) for row in rows]
        return [(row, not done and rows.shape[1] >= self.max_new_tokens) for row, done in zip(rows, ended)]

    def finish(self, output):
        """(token ids, cut) -> the caption, a Flagged caption (kept) or a Reject (dropped)."""
        ids, cut = output
        text = self.processor().decode(ids, skip_special_tokens=True)
        family = self.family()
        if family.per_element:  # BLIP's prefix continues into the caption: strip its echo
            text = clean_caption(text, self.prompt)
        checked = guards.check(text, instruction=effective_prompt(family, self.prompt) if family.chat else None,
                               cut=cut)
        if not checked.flags:
            return checked.text
        if guards.EMPTY in checked.flags or self.on_bad == "drop":
            kind = _FLAG_KINDS[checked.flags[0]]
            raw = _WS.sub(" ", checked.raw).strip()
            return Reject(kind, kind.value if not raw else f"{kind.value}: {raw[:300]!r}")
        return Flagged(checked.text, checked.flags)

    def apply(self, sample: Sample, caption) -> Sample:
        if isinstance(caption, Flagged):
            return sample.with_(caption_vlm=caption.text, caption_flags=caption.flags)
        return sample.with_(caption_vlm=caption)
