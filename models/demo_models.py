"""Tiny random-weight stand-ins for today's open vision-language captioner families, built
offline from their real config, model and processor classes and saved with `save_pretrained`.

`prep run --caption-model DIR` loads a model with `AutoProcessor.from_pretrained(DIR)` and
`AutoModelForImageTextToText.from_pretrained(DIR)`; these folders let tests and users run that
real loading and generation code path for every family prep supports with no network:

| folder (model_type) | model class | processor | input |
| --- | --- | --- | --- |
| `blip-2` | Blip2ForConditionalGeneration (OPT) | Blip2Processor | image (+ text prefix) |
| `paligemma` | PaliGemmaForConditionalGeneration (Gemma) | PaliGemmaProcessor | `caption en` |
| `florence2` | Florence2ForConditionalGeneration (DaViT + BART) | Florence2Processor | `<MORE_DETAILED_CAPTION>` |
| `qwen2_vl` | Qwen2VLForConditionalGeneration | Qwen2VLProcessor | chat |
| `smolvlm` | SmolVLMForConditionalGeneration (Idefics3) | SmolVLMProcessor | chat |
| `llava_onevision` | LlavaOnevisionForConditionalGeneration (SigLIP, Qwen2) | LlavaOnevisionProcessor | chat |

Each folder holds the family's real config class at tiny sizes (hidden 32, one or two layers,
32-64 px images, a handful of image tokens), random weights drawn after
`torch.manual_seed(seed)` (building twice gives byte-identical safetensors), a word-level
tokenizer over a small English vocabulary plus every special token the family's processor and
chat template use (ids matching the config's), the family's real processor class with its
image (and video) processor at tiny sizes, and for chat families a chat template close to the
real model's. The weights are random: captions are word salad, but every step of loading,
prompting, batching, generating and decoding is the real one.

Generation (generation_config.json): greedy, ending at the family's eos. Random weights loop,
never pick eos, or pick it at once; the demo's generation config keeps their captions
word-like, loop-free and 6-10 words long (see INIT_STD, NO_REPEAT_NGRAM_SIZE,
REPETITION_PENALTY, MIN_NEW_TOKENS, EOS_DECAY, _set_generation). BLIP-2 is the exception:
its generate runs its OPT model's generate, whose generation config transformers derives
from the text config (bos/eos/pad only), so its random captions may loop or run to the
token limit.

SmolVLM's processor needs the `num2words` package (transformers raises without it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

FAMILIES = ("blip-2", "paligemma", "florence2", "qwen2_vl", "smolvlm", "llava_onevision")
INDEX_FILE = "demo_models.json"

# Real English words (the caption words of models/tiny.py, the instructions prep and the
# families use, Florence-2's task prompts, Qwen2-VL's default system prompt), so a random
# model still writes word-like captions and every prompt tokenizes without <unk>.
_WORDS = (
    "a an the of with in on and or to is are at by for from as this that it its his her their "
    "photo picture image portrait close up face person people woman man girl boy child "
    "smiling looking camera hair dark light blond brown black grey gray long short curly "
    "wearing glasses hat cap shirt jacket dress red blue green white yellow pink orange "
    "background wall standing sitting young old head front side left right eyes mouth nose "
    "dog cat object table outdoor indoor bright colorful street room tree sky "
    "describe description caption en main subject one sentence detail detailed paragraph "
    "what does do shown show locate objects category name names descriptions region regions "
    "proposals text ocr polygon mask phrases input you helpful assistant user system "
    "question answer picture video frame frames"
).split()
_PUNCTUATION = list(".,:;?!'\"-()") + ["\n"]  # newlines are tokens, as in the real vocabularies


def _words(exclude: Iterable[str]) -> list[str]:
    seen = set(exclude)
    out = []
    for w in _WORDS + _PUNCTUATION:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _tokenizer(specials: list[str], post_bos: str | None = None, chat_template: str | None = None, **kwargs):
    """A word-level fast tokenizer: `specials` first (ids 0..n-1, in this order), then the
    words. Lower-cases ordinary text, splits words, punctuation and newlines apart (spaces
    go), decodes words with spaces and punctuation attached; special tokens match verbatim.
    `post_bos`: a token prepended to every encoded sequence (OPT's `</s>`). `kwargs`: the
    named special tokens (bos_token=...) and extra_special_tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(specials) + _words(specials))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]+"), behavior="removed", invert=True)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # no "##" pieces: spaces, then " ." -> "."
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if post_bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{post_bos} $A", pair=f"{post_bos} $A $B", special_tokens=[(post_bos, vocab[post_bos])]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _ids(tokenizer, *tokens: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    missing = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.unk_token_id and t != "<unk>"]
    if missing:
        raise AssertionError(f"tokens missing from the tokenizer: {missing}")
    return ids


def _set_generation(model, tokenizer, *, eos, pad, bos=None, decoder_start=None, forced_bos=None) -> None:
    """Greedy generation ending at the family's eos, padding with its pad token. A random model
    is kept from emitting the tokenizer's added tokens (image placeholders, chat markers,
    PaliGemma's <loc>/<seg>: never a caption's words) other than eos (and a forced bos) and the
    chat roles' names, from looping (NO_REPEAT_NGRAM_SIZE, REPETITION_PENALTY) and from
    captions that are empty or never end (MIN_NEW_TOKENS, EOS_DECAY)."""
    gen = model.generation_config
    gen._from_model_config = False  # set here, not derived from the model's config
    gen.eos_token_id = eos
    gen.pad_token_id = pad
    if bos is not None:
        gen.bos_token_id = bos
    if decoder_start is not None:
        gen.decoder_start_token_id = decoder_start
    if forced_bos is not None:
        gen.forced_bos_token_id = forced_bos
    gen.do_sample = False
    gen.num_beams = 1
    gen.no_repeat_ngram_size = NO_REPEAT_NGRAM_SIZE
    gen.repetition_penalty = REPETITION_PENALTY
    gen.min_new_tokens = MIN_NEW_TOKENS
    gen.exponential_decay_length_penalty = EOS_DECAY
    keep = set(eos if isinstance(eos, list) else [eos]) | {forced_bos}
    suppress = {i for i in tokenizer.added_tokens_decoder if i not in keep}
    suppress |= set(tokenizer.convert_tokens_to_ids(list(_ROLE_WORDS))) - {tokenizer.unk_token_id}
    gen.suppress_tokens = sorted(suppress)
    for name in ("temperature", "top_p", "top_k"):  # greedy: sampling knobs would only warn
        if getattr(gen, name, None) is not None:
            setattr(gen, name, None)


# The weights' init std. At the real models' 0.02, a 32-wide random model's residual stream is
# little more than its input embedding: it echoes its last token (BLIP-2 and Florence-2, whose
# last input token is bos = eos, end at once with an empty caption) and ignores the image. At
# 0.5 the layers and the image matter: different images give different captions.
INIT_STD = 0.5
# Greedy decoding of a random model loops on a few tokens; no n-gram of 3 twice (Florence-2's
# own setting) keeps its captions loop-free (a word at most 3 times in a row, no phrase twice).
NO_REPEAT_NGRAM_SIZE = 3
# ... and with punctuation between, a word can still come back again and again ("helpful ?
# helpful : helpful"): a mild repetition penalty (Qwen2-VL ships 1.05) keeps the words varied.
REPETITION_PENALTY = 1.3
# A random model picks eos about never (every caption would be cut at the token limit) or at
# once (empty): at least 2 new tokens, then eos's score grows by 1.6x per token after the 5th
# (transformers' exponential_decay_length_penalty), so captions end after about 6-10 words.
MIN_NEW_TOKENS = 2
EOS_DECAY = (5, 1.6)
# Chat roles' names: never a caption's words (and "assistant:" would read as an echoed template).
_ROLE_WORDS = ("user", "assistant", "system")


def _configs(config):
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _configs(sub)


def _seeded(seed: int, model_class, config):
    """`model_class(config)` with weights drawn after torch.manual_seed(seed), in eval mode."""
    import torch

    for c in _configs(config):
        for name in ("initializer_range", "init_std"):
            if hasattr(c, name):
                setattr(c, name, INIT_STD)
    torch.manual_seed(seed)
    return model_class(config).eval()


# --- BLIP-2 -----------------------------------------------------------------------------------


def _blip2(seed: int):
    """As bench/gpu_check.py's blip2_config(tiny=True) and bench/ceiling.py's blip2_processor
    build it (ViT + Q-Former + OPT from dicts, BLIP image processor with CLIP mean/std,
    Blip2Processor with num_query_tokens), at 32 px and with OPT's special tokens."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    # OPT's ids: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3; OPT's tokenizer prepends </s>.
    tokenizer = _tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>", "<image>"], post_bos="</s>",
        bos_token="</s>", eos_token="</s>", pad_token="<pad>",
    )
    num_query_tokens = 8
    image = BlipImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = Blip2Processor(image_processor=image, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    bos, pad, image_id = _ids(tokenizer, "</s>", "<pad>", "<image>")
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=len(tokenizer), pad_token_id=pad),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(tokenizer), word_embed_proj_dim=32, max_position_embeddings=128,
                         bos_token_id=bos, eos_token_id=bos, pad_token_id=pad),
        num_query_tokens=num_query_tokens,
        image_token_index=image_id,
    )
    model = _seeded(seed, Blip2ForConditionalGeneration, config)
    # BLIP-2's generate runs its language model's generate, whose generation config comes from
    # text_config (bos/eos/pad above): the settings below only hold where a caller passes them.
    _set_generation(model, processor.tokenizer, eos=bos, pad=pad, bos=bos)
    return model, processor


# --- PaliGemma --------------------------------------------------------------------------------


def _paligemma(seed: int):
    """PaliGemma (1): SigLIP 32 px / patch 8 (16 image tokens) and a Gemma decoder."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

    # Gemma's ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3; PaliGemma's <image>; then, as in the real
    # tokenizer, <loc0000>..<loc1023> and <seg000>..<seg127> (PaliGemmaProcessor adds them at
    # every load: added here first, their ids are fixed and the model's vocabulary covers them).
    tokenizer = _tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_tokens(EXTRA_TOKENS)  # before the processor: its add_tokens is then a no-op
    image_tokens = 16
    image = SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=image_tokens)
    image.image_seq_length = image_tokens
    processor = PaliGemmaProcessor(image_processor=image, tokenizer=tokenizer)
    pad, eos, bos, image_id = _ids(tokenizer, "<pad>", "<eos>", "<bos>", "<image>")
    vocab = len(tokenizer)
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=32, vision_use_head=False),
        text_config=dict(model_type="gemma", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=256, pad_token_id=pad, eos_token_id=eos, bos_token_id=bos,
                         num_image_tokens=image_tokens),
        image_token_index=image_id, vocab_size=vocab, projection_dim=32, hidden_size=32,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=bos,
    )
    model = _seeded(seed, PaliGemmaForConditionalGeneration, config)
    _set_generation(model, processor.tokenizer, eos=eos, pad=pad, bos=bos)
    return model, processor


# --- Florence-2 -------------------------------------------------------------------------------


def _florence2(seed: int):
    """Florence-2: a 4-stage DaViT at 64 px (2x2 features + 1 pooled = 5 image tokens) and a
    BART encoder-decoder. Task tokens (<CAPTION>, <MORE_DETAILED_CAPTION>, ...) are not
    tokens: the processor turns them into English prompts, whose words are in the vocabulary."""
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    # BART's ids: <s>=0, <pad>=1, </s>=2, <unk>=3; Florence-2's <image>.
    tokenizer = _tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>", "<image>"],
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
    )
    image_tokens = 5
    image = CLIPImageProcessor(
        size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64}, do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], image_seq_length=image_tokens,
    )
    image.image_seq_length = image_tokens
    processor = Florence2Processor(image_processor=image, tokenizer=tokenizer)
    bos, pad, eos, image_id = _ids(tokenizer, "<s>", "<pad>", "</s>", "<image>")
    config = Florence2Config(
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[16, 16, 32, 32], num_heads=[1, 1, 2, 2],
                           num_groups=[1, 1, 2, 2], window_size=2, projection_dim=32, max_position_embeddings=16,
                           drop_path_rate=0.0),
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), d_model=32, encoder_layers=1,
                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=eos,
                         forced_bos_token_id=bos),
        image_token_id=image_id,
    )
    model = _seeded(seed, Florence2ForConditionalGeneration, config)
    _set_generation(model, processor.tokenizer, eos=eos, pad=pad, bos=bos, decoder_start=eos, forced_bos=bos)
    return model, processor


# --- Qwen2-VL ---------------------------------------------------------------------------------

# Qwen2-VL-Instruct's chat template (system prompt, <|vision_start|><|image_pad|><|vision_end|>
# per image, <|im_start|>/<|im_end|> turns).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen2_vl(seed: int):
    """Qwen2-VL: a 1-layer ViT (patch 8, 2x2 merge: one image token per 16x16 px) and a Qwen2
    decoder with M-RoPE; images resized to 16..64x64 px-ish areas (12 tokens for 178x218)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]
    tokenizer = _tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           chat_template=QWEN2_VL_CHAT_TEMPLATE)
    size = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}  # pixels (min_pixels, max_pixels)
    shape = dict(patch_size=8, temporal_patch_size=2, merge_size=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **shape),
        video_processor=Qwen2VLVideoProcessor(size=size, **shape),
        tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    endoftext, im_end, v_start, v_end, image_id, video_id = _ids(
        tokenizer, "<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
        "<|video_pad|>")
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, in_channels=3,
                           **{k.replace("merge_size", "spatial_merge_size"): v for k, v in shape.items()}),
        image_token_id=image_id, video_token_id=video_id, vision_start_token_id=v_start,
        vision_end_token_id=v_end, bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext,
    )
    model = _seeded(seed, Qwen2VLForConditionalGeneration, config)
    _set_generation(model, processor.tokenizer, eos=[im_end, endoftext], pad=endoftext, bos=endoftext)
    return model, processor


# --- SmolVLM ----------------------------------------------------------------------------------

# SmolVLM-Instruct's chat template (as transformers' SmolVLM processor ships it): "User:<image>
# ...<end_of_utterance>\nAssistant:".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _smolvlm(seed: int):
    """SmolVLM: a SigLIP-like encoder at 32 px / patch 8 with pixel shuffle (scale 2): 4 image
    tokens per 32 px tile; images resized to 64 px on the long side and split into 32 px tiles
    plus a global image, as the real processor does (<row_i_col_j>, <global-img>)."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<fake_token_around_image>", "<image>",
                "<end_of_utterance>", "<global-img>", "<video>", *rows]
    tokenizer = _tokenizer(
        specials, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                              "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"},
    )
    tile, patch, scale = 32, 8, 2
    image_seq_len = (tile // patch) ** 2 // scale**2
    image = SmolVLMImageProcessor(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile},
                                  do_image_splitting=True)
    video = SmolVLMVideoProcessor(size={"longest_edge": tile}, max_image_size={"longest_edge": tile})
    processor = SmolVLMProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                 image_seq_len=image_seq_len, chat_template=SMOLVLM_CHAT_TEMPLATE)
    bos, eos, pad, image_id = _ids(tokenizer, "<|im_start|>", "<end_of_utterance>", "<|im_end|>", "<image>")
    config = SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=tile, patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=512, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad),
        scale_factor=scale, image_token_id=image_id, pad_token_id=pad,
    )
    model = _seeded(seed, SmolVLMForConditionalGeneration, config)
    _set_generation(model, processor.tokenizer, eos=eos, pad=pad, bos=bos)
    return model, processor


# --- LLaVA-OneVision --------------------------------------------------------------------------

# llava-hf's LLaVA-OneVision (Qwen2) chat template: images, then videos, then the text of each
# turn, "<|im_start|>role ...<|im_end|>".
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _llava_onevision(seed: int):
    """LLaVA-OneVision: SigLIP at 32 px / patch 8 (16 features per tile), anyres tiling over
    32..64 px grids with an image-newline feature, a Qwen2 decoder."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>"]
    tokenizer = _tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
                           extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    tile, patch = 32, 8
    pinpoints = [[tile * r, tile * c] for r in (1, 2) for c in (1, 2)]
    image = LlavaOnevisionImageProcessor(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    video = LlavaOnevisionVideoProcessor(size={"height": tile, "width": tile})
    processor = LlavaOnevisionProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full", chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
    endoftext, im_end, image_id, video_id = _ids(tokenizer, "<|endoftext|>", "<|im_end|>", "<image>", "<video>")
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=tile, patch_size=patch,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, bos_token_id=endoftext, eos_token_id=im_end,
                         pad_token_id=endoftext),
        image_token_index=image_id, video_token_index=video_id, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
    )
    model = _seeded(seed, LlavaOnevisionForConditionalGeneration, config)
    _set_generation(model, processor.tokenizer, eos=[im_end, endoftext], pad=endoftext, bos=endoftext)
    return model, processor


_BUILDERS: dict[str, Callable] = {
    "blip-2": _blip2,
    "paligemma": _paligemma,
    "florence2": _florence2,
    "qwen2_vl": _qwen2_vl,
    "smolvlm": _smolvlm,
    "llava_onevision": _llava_onevision,
}


def _fresh_folder(folder: Path) -> None:
    """Empty `folder` for a rebuild; refuse to clear a non-empty folder that is not a model's."""
    if folder.exists():
        if any(folder.iterdir()) and not (folder / "config.json").is_file():
            raise FileExistsError(f"{folder} exists and does not hold a saved model: not overwriting it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_demo_models(
    root: str | os.PathLike, families: Iterable[str] | None = None, seed: int = 0
) -> dict[str, str]:
    """Build the tiny demo captioners of `families` (default: all of FAMILIES) under `root`,
    one folder per family named by its config's `model_type`; returns {model_type: folder}.

    Also writes `root/demo_models.json`: {model_type: {folder, class, processor, params,
    bytes, seconds}} (merged with the entries of families built earlier into the same root)."""
    from transformers.utils import logging as hf_logging

    wanted = list(dict.fromkeys(families or FAMILIES))
    unknown = [f for f in wanted if f not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown demo model family {unknown}; choose from {', '.join(FAMILIES)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tiny sizes and missing hub files make harmless warnings
    built: dict[str, str] = {}
    entries: dict[str, dict] = {}
    try:
        for family in wanted:
            start = time.perf_counter()
            model, processor = _BUILDERS[family](seed)
            model_type = model.config.model_type
            folder = root / model_type
            _fresh_folder(folder)
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            built[model_type] = str(folder)
            entries[model_type] = {
                "folder": str(folder),
                "class": type(model).__name__,
                "processor": type(processor).__name__,
                "params": sum(p.numel() for p in model.parameters()),
                "bytes": _folder_bytes(folder),
                "seconds": round(time.perf_counter() - start, 2),
            }
    finally:
        hf_logging.set_verbosity(verbosity)
    index = root / INDEX_FILE
    previous: dict = {}
    if index.is_file():
        try:
            previous = json.loads(index.read_text())
        except ValueError:
            previous = {}
    previous = {k: v for k, v in previous.items() if isinstance(v, dict) and Path(v.get("folder", "")).is_dir()}
    previous.update(entries)
    index.write_text(json.dumps(dict(sorted(previous.items())), indent=1) + "\n")
    return built
