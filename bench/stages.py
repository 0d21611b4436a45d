"""Stage benchmark: does the pipeline slow the models down?

For each model stage (caption, mask, embed), on the same images, with the same model and the
same batch size, in one process:
  (a) plain:    a plain batched loop that decodes, preprocesses and calls the model directly;
  (b) pipeline: the stage as the pipeline runs it (ModelStage = RunInference + dead-letter
                routing) on Beam's in-memory runner, fed the same Samples.
Each variant runs in a fresh process (torch work on a process's main thread slows torch on its
other threads, where Beam runs bundles, by up to 2x on 2 cores). Model loading is excluded
from both (RunInference's own load-time metric is subtracted for the pipeline); Beam's fixed
start-up (~0.7 s: graph translation, runner set-up) is included and amortises with --images.
Prints one JSON line per stage:
  {"stage", "model", "batch", "images", "plain_ips", "pipeline_ips", "ratio", ...}

    python -m bench.stages                     # offline models, under 2 min on 2 CPU cores
    python -m bench.stages --real --device cuda --images 2048   # the paper's real models on a GPU
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED_U2NETP = Path(__file__).resolve().parents[2] / "shared" / "models" / "u2netp.onnx"


def build_small_blip(directory: str) -> str:
    """A BLIP captioner of realistic shape but small width (224 px input), random weights."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    from transformers.utils import logging as hf_logging

    from prep.models.tiny import _CAPTION_WORDS

    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    hf_logging.disable_progress_bar()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(_CAPTION_WORDS)))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=vocab["[DEC]"],
                         pad_token_id=0, sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"]),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=224, patch_size=16),
        projection_dim=256,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    # Random weights emit special tokens at once (an empty caption, rejected by the stage):
    # bias the output layer against them, so every caption is max_new_tokens real words and
    # every batch does the same generation work.
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[[vocab[t] for t in specials]] = -1e4
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def real_qwen2_vl_processor(directory: str):
    """prep demo-models' Qwen2-VL processor (tokenizer, chat template) with Qwen2-VL's real image
    processor (patch 14, 2x2 merge, its pixel limits: 48 image tokens for a CelebA image)."""
    from transformers import AutoProcessor, Qwen2VLImageProcessor

    from prep.models.demo_models import build_demo_models

    folder = build_demo_models(os.path.join(directory, "demo"), ["qwen2_vl"])["qwen2_vl"]
    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, patch_size=14, temporal_patch_size=2,
        merge_size=2)
    return processor


def build_small_chat(directory: str) -> str:
    """A Qwen2-VL captioner of realistic shape but small width (Qwen2-VL's real image processor:
    patch 14, 2x2 merge, 48 image tokens for a CelebA image; a 4-layer ViT and a 4-layer
    decoder of width 256), random weights, with prep demo-models' tokenizer and chat template,
    saved with save_pretrained: loaded by the stage as a real checkpoint is."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from bench.gpu_check import qwen2_vl_config

    processor = real_qwen2_vl_processor(directory)
    config = qwen2_vl_config(
        processor.tokenizer, tiny=True,
        text_sizes=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                                "mrope_section": [8, 12, 12]}),
        vision_sizes=dict(depth=4, embed_dim=256, hidden_size=256, num_heads=4, mlp_ratio=4, patch_size=14))
    torch.manual_seed(0)
    net = Qwen2VLForConditionalGeneration(config).eval()
    net.generation_config.eos_token_id = None  # random weights: every caption is max_new_tokens long
    net.generation_config.pad_token_id = config.text_config.pad_token_id
    # Random logits pick special tokens too, which decode to nothing (an empty caption, rejected
    # by the stage): generate words only, as the BLIP above does.
    tokenizer = processor.tokenizer
    net.generation_config.suppress_tokens = sorted(set(tokenizer.all_special_ids)
                                                   | set(tokenizer.get_added_vocab().values()))
    out = os.path.join(directory, "model")
    net.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_samples(n: int, work: str):
    """n decoded demo images as Samples, each with a centred elliptical mask."""
    from PIL import Image, ImageDraw

    from prep.demo import write_demo_data
    from prep.schemas.records import Sample
    from prep.transforms.decode import decode_image
    from prep.transforms.mask import mask_png

    per_identity = 8
    celeba = os.path.join(work, "demo", "celeba")
    paths = sorted(glob.glob(os.path.join(celeba, "img_align_celeba", "*.jpg")))
    if len(paths) < n:  # made once per work folder; every variant's process reads the same images
        info = write_demo_data(os.path.join(work, "demo"), identities=max(1, -(-n // per_identity)),
                               images_per_identity=per_identity, general_shards=0, overwrite=True)
        paths = sorted(glob.glob(os.path.join(info["celeba_dir"], "img_align_celeba", "*.jpg")))
    paths = paths[:n]
    samples = []
    for i, path in enumerate(paths):
        jpeg, w, h = decode_image(Path(path).read_bytes())
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).ellipse((w // 5, h // 6, 4 * w // 5, 5 * h // 6), fill=255)
        samples.append(Sample(key=f"k{i:06d}", source="bench", domain="specific", path=path, identity=str(i % 7),
                              image_jpeg=jpeg, width=w, height=h, mask_png=mask_png(np.asarray(mask))))
    return samples


# -- plain loops: the model called directly ------------------------------------------------

def plain_caption(handler, samples, batch):
    import torch

    from prep.transforms.caption import clean_caption
    from prep.transforms.decode import load_rgb

    loaded = handler.load_model()
    processor, net, device = loaded.processor, loaded.model, loaded.device
    chat = not handler.family().per_element
    text = handler.prompt_text() if chat else None  # the chat template around the instruction
    start = time.perf_counter()
    out = []
    for i in range(0, len(samples), batch):
        images = [load_rgb(s.image_jpeg) for s in samples[i:i + batch]]
        kwargs = {"text": [text] * len(images), "padding": True} if chat else {}
        inputs = processor(images=images, return_tensors="pt", **kwargs).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        with torch.inference_mode():
            ids = net.generate(**inputs, max_new_tokens=handler.max_new_tokens, num_beams=1, do_sample=False)
        if chat:  # the new tokens only
            ids = ids[:, inputs["input_ids"].shape[1]:]
        out += [clean_caption(t) for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return time.perf_counter() - start, len(out)


def plain_mask(handler, samples, batch):
    from prep.transforms.decode import load_rgb
    from prep.transforms.mask import binarize, mask_png

    session = handler.load_model()
    start = time.perf_counter()
    out = []
    for i in range(0, len(samples), batch):
        for s in samples[i:i + batch]:
            out.append(mask_png(binarize(session.predict(load_rgb(s.image_jpeg))[0])))
    return time.perf_counter() - start, len(out)


def plain_embed(handler, samples, batch):
    import torch

    from prep.transforms.decode import load_rgb
    from prep.transforms.mask import load_mask, masked_image

    loaded = handler.load_model()
    net = loaded.model
    dtype = next(net.parameters()).dtype
    start = time.perf_counter()
    out = []
    for i in range(0, len(samples), batch):
        x = loaded.batch([loaded.host_pixels(masked_image(load_rgb(s.image_jpeg), load_mask(s.mask_png)))
                          for s in samples[i:i + batch]])
        with torch.inference_mode():
            feats = torch.nn.functional.normalize(net.encode_image(loaded.device_pixels(x).to(dtype)).float(), dim=-1)
        out += list(feats.cpu().numpy())
    return time.perf_counter() - start, len(out)


# -- the same stage inside a Beam pipeline --------------------------------------------------

def pipeline_stage(handler, samples):
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from prep.transforms.inference import ModelStage

    from apache_beam.metrics.metric import MetricsFilter

    from bench.common import feed_by_key

    start = time.perf_counter()
    p = beam.Pipeline(runner=FnApiRunner())
    # Keys only in the graph (feed_by_key), no reshuffle: measure the stage, not its input.
    _ = feed_by_key(p, samples) | "Stage" >> ModelStage(handler)
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - start
    query = result.metrics().query(MetricsFilter().with_name(f"{handler.stage}.ok"))
    n = sum(c.committed for c in query["counters"])
    # RunInference reports its own model-load time; it is excluded, as in the plain loop.
    loads = result.metrics().query(MetricsFilter().with_name("load_model_latency_milli_secs"))
    load_s = sum(d.committed.sum for d in loads["distributions"]) / 1000.0
    return wall - load_s, n, wall, load_s


def make_handler(stage: str, models: dict, args):
    from prep.transforms.caption import CaptionHandler
    from prep.transforms.embed import EmbedHandler
    from prep.transforms.mask import MaskHandler

    if stage == "embed":
        model = models["embed"]
        handler = EmbedHandler(model[0], model[1], device=args.device, max_batch_size=args.embed_batch)
        return handler, plain_embed, args.embed_batch, f"{model[0]}/{model[1] or 'random'}"
    if stage == "mask":
        handler = MaskHandler(models["mask"], device=args.device, max_batch_size=args.mask_batch)
        return handler, plain_mask, args.mask_batch, models["mask"]
    if stage == "caption":
        handler = CaptionHandler(models["caption"], max_new_tokens=20, device=args.device, max_batch_size=args.caption_batch,
                                 on_bad="keep")  # every caption written: the same work as a plain loop
        return handler, plain_caption, args.caption_batch, models["caption"]
    raise SystemExit(f"unknown stage {stage!r}")


def run_variant(args, models: dict) -> dict:
    """One (stage, variant) measurement, in this (fresh) process."""
    stage, variant = args.child.split(":")
    samples = make_samples(args.images, args.work)
    handler, plain, batch, _ = make_handler(stage, models, args)
    if variant == "plain":
        seconds, n = plain(handler, samples, batch)
        return {"seconds": seconds, "n": n}
    seconds, n, wall, load_s = pipeline_stage(handler, samples)
    return {"seconds": seconds, "n": n, "wall": wall, "load": load_s}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None,
                        help="images per stage (default: embed 384, caption 256, mask 64: ~2 min on 2 cores)")
    parser.add_argument("--stages", default="embed,mask,caption")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real", action="store_true", help="the paper preset's real models (needs them cached)")
    parser.add_argument("--embed-batch", type=int, default=16)
    parser.add_argument("--caption-batch", type=int, default=8)
    parser.add_argument("--caption-family", default="blip", choices=["blip", "qwen2_vl"],
                        help="the captioner: a small BLIP, or a small Qwen2-VL (a chat family: its template, "
                        "left padding, the processor on the whole batch)")
    parser.add_argument("--mask-batch", type=int, default=8)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # STAGE:plain|pipeline
    parser.add_argument("--models", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(run_variant(args, json.loads(args.models))), flush=True)
        return

    import subprocess
    import sys

    from prep.models.tiny import ensure_tiny_models

    work = args.work or tempfile.mkdtemp(prefix="prep-bench-")
    defaults = {"embed": 384, "caption": 256, "mask": 64}
    if args.real:
        models = {"caption": "Salesforce/blip2-opt-2.7b", "embed": ("ViT-L-14", "openai"), "mask": "u2net"}
    else:
        mask = str(SHARED_U2NETP) if SHARED_U2NETP.is_file() else ensure_tiny_models(os.path.join(work, "tiny")).mask_onnx
        if args.caption_family == "qwen2_vl":
            chat = os.path.join(work, "small-qwen2-vl")
            # Built in a child: torch work on this process's main thread is not wanted (see below).
            subprocess.run([sys.executable, "-c", f"from bench.stages import build_small_chat; build_small_chat({chat!r})"],
                           check=True)
            captioner = os.path.join(chat, "model")
        else:
            captioner = os.path.join(work, "small-blip")
            subprocess.run([sys.executable, "-c",
                            f"from bench.stages import build_small_blip; build_small_blip({captioner!r})"], check=True)
        models = {"caption": captioner, "embed": ("ViT-B-32", None), "mask": mask}
    make_samples(args.images or max(defaults.values()), work)
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        n = args.images or defaults.get(stage, 64)
        # Each variant in a fresh process: torch ops that ran on a process's main thread slow
        # down torch on its other threads (where Beam runs bundles) by up to 2x on 2 cores
        # (OpenMP thread teams compete), so one process for both would bias the comparison.
        results = {}
        for variant in ("plain", "pipeline"):
            cmd = [sys.executable, "-m", "bench.stages", "--child", f"{stage}:{variant}", "--models", json.dumps(models),
                   "--images", str(n), "--work", work, "--device", args.device, "--embed-batch", str(args.embed_batch),
                   "--caption-batch", str(args.caption_batch), "--mask-batch", str(args.mask_batch)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[variant] = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
        plain, pipe = results["plain"], results["pipeline"]
        if plain["n"] != n or pipe["n"] != n:
            raise SystemExit(f"{stage}: lost images (plain {plain['n']}, pipeline {pipe['n']} of {n})")
        _, _, batch, label = make_handler(stage, models, args)
        plain_ips, pipe_ips = n / plain["seconds"], n / pipe["seconds"]
        print(json.dumps({
            "stage": stage, "model": os.path.basename(str(label)), "batch": batch, "images": n,
            "plain_ips": round(plain_ips, 2), "pipeline_ips": round(pipe_ips, 2), "ratio": round(pipe_ips / plain_ips, 3),
            "pipeline_wall_s": round(pipe["wall"], 2), "model_load_s": round(pipe["load"], 2), "device": args.device,
        }), flush=True)


if __name__ == "__main__":
    main()
