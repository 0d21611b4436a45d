"""GPU check: each model stage's images/s with the paper preset's architectures at random
init (BLIP-2 OPT-2.7B and ViT-L-14 in fp16, u2net-family ONNX), against its ceilings.

Per stage, on the same CelebA-size images (178x218), in one process:
  model_ips    the model alone on prepared batches (infer only, fixed batch)
  stage_ips    the stage as the pipeline runs it (ModelStage on Beam's in-memory runner, net
               of start-up) with the prepare pool on (serial_ips: prepare_threads=1)
  zero_ips     the same stage with a model that returns at once (bench/ceiling.py)
  plain_ips    a plain threaded loop of the stage's preprocessing alone
  of_bound     stage_ips / min(model_ips, zero_ips): 1.0 means the pipeline adds nothing
Random weights: nothing is downloaded (offline machines); the work per image is the real
one (the captioner's end-of-text token is disabled, so it always generates max_new_tokens).
The mask stage uses onnxruntime's CUDA provider when it is installed, else the CPU one
(the table says which). Prints one table; --json PATH also writes the records.

    bash bench/gpu_check.sh                       # on a GPU machine: under 5 minutes
    python -m bench.gpu_check --device cpu --tiny  # the same code on CPU with tiny models (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from bench.ceiling import (
    BLIP2_IMAGE_SIZE,
    blip2_processor,
    load_samples,
    plain_loop,
    stage_timing,
    write_images,
    zero_cost_handler,
)
from prep.transforms.caption import CaptionHandler
from prep.transforms.embed import EmbedHandler
from prep.transforms.mask import MaskHandler

REPO = Path(__file__).resolve().parents[1]
U2NETP_PLACES = [REPO / "shared" / "models" / "u2netp.onnx", REPO.parent / "shared" / "models" / "u2netp.onnx"]
_BUILT: dict = {}  # stage -> the loaded model; handlers look it up (never pickled into the graph)


# -- the paper's architectures at random init ----------------------------------------------

def blip2_config(tiny: bool):
    from transformers import Blip2Config

    if tiny:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      image_size=BLIP2_IMAGE_SIZE, patch_size=32)
        qformer = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       encoder_hidden_size=64)
        text = dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2,
                    vocab_size=1040, word_embed_proj_dim=64, max_position_embeddings=128,
                    bos_token_id=2, eos_token_id=3, pad_token_id=1)
        return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=8,
                           image_token_index=1030)
    # Salesforce/blip2-opt-2.7b: ViT-g/14 (the vision defaults), a 12-layer Q-Former, OPT-2.7B.
    text = dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=50304, word_embed_proj_dim=2560, max_position_embeddings=2048,
                bos_token_id=2, eos_token_id=50118, pad_token_id=1)
    return Blip2Config(text_config=text, num_query_tokens=32, image_token_index=50265)


def random_captioner(model_class, config, device: str):
    """(the model at random init, its dtype): fp16 on CUDA, built in its final precision on
    the device (no fp32 copy), generating max_new_tokens always (no end token)."""
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    net = net.to(device=device, dtype=dtype).eval()
    net.generation_config.eos_token_id = None  # random weights: always generate max_new_tokens
    net.generation_config.pad_token_id = config.text_config.pad_token_id
    return net, dtype


def build_captioner(device: str, tiny: bool):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from prep.transforms.caption import LoadedCaptioner

    config = blip2_config(tiny)
    net, dtype = random_captioner(Blip2ForConditionalGeneration, config, device)
    base = blip2_processor(vocab_size=config.text_config.vocab_size)
    processor = Blip2Processor(image_processor=base.image_processor, tokenizer=base.tokenizer,
                               num_query_tokens=config.num_query_tokens)
    params = sum(p.numel() for p in net.parameters())
    return LoadedCaptioner(processor, net, device, dtype), params, str(dtype).replace("torch.", "")


def qwen2_vl_config(tokenizer, tiny: bool, text_sizes: Optional[dict] = None, vision_sizes: Optional[dict] = None):
    """Qwen2-VL-2B-Instruct's architecture (tiny: prep demo-models' sizes), with the special
    token ids of the processor's tokenizer (the vocabulary is the real one's size)."""
    from transformers import Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("pad", "<|endoftext|>"), ("eos", "<|im_end|>"), ("v_start", "<|vision_start|>"),
        ("v_end", "<|vision_end|>"), ("image", "<|image_pad|>"), ("video", "<|video_pad|>"))}
    if tiny:
        text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=8,
                      temporal_patch_size=2, spatial_merge_size=2)
    else:  # Qwen/Qwen2-VL-2B-Instruct
        text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, in_channels=3,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
    text.update(text_sizes or {})
    vision.update(vision_sizes or {})
    text.update(bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image"],
                         video_token_id=ids["video"], vision_start_token_id=ids["v_start"],
                         vision_end_token_id=ids["v_end"], bos_token_id=ids["pad"], eos_token_id=ids["eos"],
                         pad_token_id=ids["pad"])


def build_chat_captioner(device: str, tiny: bool, work: str):
    """Qwen2-VL (a chat family) at random init: prep demo-models' processor (its tokenizer and
    chat template), with Qwen2-VL's real image processor (patch 14, 2x2 merge) unless tiny."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    from prep.models.demo_models import build_demo_models
    from prep.transforms.caption import LoadedCaptioner

    folder = build_demo_models(os.path.join(work, "demo-models"), ["qwen2_vl"])["qwen2_vl"]
    processor = AutoProcessor.from_pretrained(folder)
    if not tiny:
        processor.image_processor = Qwen2VLImageProcessor(
            size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, patch_size=14, temporal_patch_size=2,
            merge_size=2)
    processor.tokenizer.padding_side = "left"
    config = qwen2_vl_config(processor.tokenizer, tiny)
    net, dtype = random_captioner(Qwen2VLForConditionalGeneration, config, device)
    # The demo tokenizer knows ~150 of the real vocabulary's 151,936 ids: random logits would
    # pick unknown ids, which decode to nothing (every caption "empty"). The logits over all of
    # them are still computed; generation only picks among the tokenizer's.
    net.generation_config.suppress_tokens = list(range(len(processor.tokenizer), config.text_config.vocab_size))
    params = sum(p.numel() for p in net.parameters())
    return LoadedCaptioner(processor, net, device, dtype), params, str(dtype).replace("torch.", "")


def build_clip(device: str, tiny: bool, work: str):
    from prep.transforms.embed import LoadedClip, load_clip

    name = "ViT-L-14"
    if tiny:
        name = os.path.join(work, "gpu-check-tiny-clip.json")
        with open(name, "w") as f:
            json.dump({"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
                       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}, f)
    precision = "fp16" if device.startswith("cuda") else "fp32"
    net, preprocess = load_clip(name, None, device, precision)
    params = sum(p.numel() for p in net.parameters())
    return LoadedClip(net, preprocess, device), params, precision


def mask_onnx(work: str, tiny: bool) -> str:
    if not tiny:
        for place in U2NETP_PLACES:
            if place.is_file():
                return str(place)
    from prep.models.tiny import build_tiny_mask_onnx

    path = Path(work) / "gpu-check-mask.onnx"
    if not path.is_file():
        build_tiny_mask_onnx(path)
    return str(path)


# -- handlers over the built models ----------------------------------------------------------

class BuiltCaption(CaptionHandler):
    def processor(self):
        return _BUILT["caption"].processor

    def family(self):
        from prep.transforms.captioners import family_of

        return family_of(_BUILT["caption"].model.config.model_type)

    def load_model(self):
        return _BUILT["caption"]


class BuiltEmbed(EmbedHandler):
    def load_model(self):
        return _BUILT["embed"]


class BuiltMask(MaskHandler):
    def load_model(self):
        return _BUILT["mask"]


def handlers(stage: str, device: str, batch: int, threads: int, mask_path: str, max_new_tokens: int):
    """(pooled, serial) handlers of the real stage class whose load_model returns the built
    model (module-level classes of an importable module: the graph pickles them by name)."""
    if stage == "caption":
        make = lambda t: BuiltCaption("random-init", max_new_tokens=max_new_tokens, device=device, on_bad="keep",  # noqa: E731
                                      max_batch_size=batch, prepare_threads=t)
    elif stage == "embed":
        make = lambda t: BuiltEmbed("random-init", None, device=device, max_batch_size=batch, prepare_threads=t)  # noqa: E731
    else:
        make = lambda t: BuiltMask(mask_path, device=device, max_batch_size=batch, prepare_threads=t)  # noqa: E731
    return make(threads), make(1)


def model_only_ips(handler, samples, min_seconds: float) -> float:
    model = handler.load_model()
    prepared = [handler.prepare(s, model) for s in samples[: handler.max_batch_size]]
    handler._infer_fixed(prepared, model)  # warm-up (kernels, allocator)
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < min_seconds:
        handler._infer_fixed(prepared, model)  # returns host values: the device is synchronised
        calls += 1
    return calls * len(prepared) / (time.perf_counter() - start)


def check_stage(stage: str, args, samples, mask_path: str) -> dict:
    import torch

    family = None
    if ":" in stage:  # caption:qwen2_vl
        stage, family = stage.split(":", 1)
    batch = {"caption": args.caption_batch, "embed": args.embed_batch, "mask": args.mask_batch}[stage]
    t0 = time.perf_counter()
    if stage == "caption" and family == "qwen2_vl":
        _BUILT[stage], params, precision = build_chat_captioner(args.device, args.tiny, args.work)
        label = "Qwen2-VL-2B" if not args.tiny else "Qwen2-VL tiny"
    elif stage == "caption":
        _BUILT[stage], params, precision = build_captioner(args.device, args.tiny)
        label = "BLIP-2 OPT-2.7B" if not args.tiny else "BLIP-2 tiny"
    elif stage == "embed":
        _BUILT[stage], params, precision = build_clip(args.device, args.tiny, args.work)
        label = "ViT-L-14" if not args.tiny else "CLIP tiny"
    else:
        pooled, _ = handlers(stage, args.device, batch, args.threads, mask_path, args.max_new_tokens)
        session = MaskHandler_load(pooled)
        _BUILT[stage] = session
        providers = session.inner_session.get_providers()
        precision = "fp32, " + ("CUDA" if "CUDAExecutionProvider" in providers else "CPU provider")
        params = os.path.getsize(mask_path) / 4  # fp32 initializers
        label = os.path.basename(mask_path)[:16]
    build_s = time.perf_counter() - t0
    pooled, serial = handlers(stage, args.device, batch, args.threads, mask_path, args.max_new_tokens)
    record = {"stage": stage, "model": label, "params_m": round(params / 1e6, 1) if params else None,
              "precision": precision, "batch": batch, "images": len(samples), "build_s": round(build_s, 1)}
    # The stage's own outcome on a few images first: a stage that rejects every image would
    # otherwise show only as a tiny stage_ips.
    rejected = [r.inference.reason for r in pooled.run_inference(samples[:3], pooled.load_model())
                if hasattr(r.inference, "reason")]
    if rejected:
        record["rejected"] = f"{len(rejected)}/3: {rejected[0][:300]}"
        print(f"[gpu_check] {label}: the stage rejected {record['rejected']}", file=sys.stderr, flush=True)
    record["model_ips"] = model_only_ips(pooled, samples, args.min_seconds)
    record["stage_ips"] = stage_timing(pooled, samples)["net_ips"]
    record["serial_ips"] = stage_timing(serial, samples)["net_ips"]
    if family is None:  # the zero-cost stage and plain loop are BLIP-2's processor: not a chat family's
        zero = zero_cost_handler(stage, args.threads, batch)
        record["zero_ips"] = stage_timing(zero, samples)["net_ips"]
        seconds, done = plain_loop(zero, samples, args.threads)
        record["plain_ips"] = done / seconds
    record["of_bound"] = record["stage_ips"] / min(record["model_ips"], record.get("zero_ips") or record["model_ips"])
    for key in ("model_ips", "stage_ips", "serial_ips", "zero_ips", "plain_ips", "of_bound"):
        if key in record:
            record[key] = round(record[key], 2 if key == "of_bound" else 1)
    _BUILT.pop(stage, None)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return record


def MaskHandler_load(handler):  # noqa: N802 - the real load path (rembg session, providers as the stage picks)
    return MaskHandler.load_model(handler)


COLUMNS = [("stage", 8), ("model", 16), ("params_m", 9), ("precision", 18), ("batch", 5), ("model_ips", 10),
           ("stage_ips", 10), ("serial_ips", 10), ("zero_ips", 9), ("plain_ips", 10), ("of_bound", 8)]


def format_table(records: list[dict], header: str) -> str:
    lines = [header, "  ".join(name.ljust(width) for name, width in COLUMNS)]
    for r in records:
        lines.append("  ".join(str(r.get(name, "")).ljust(width) for name, width in COLUMNS))
    lines.append("img/s: model_ips = model alone; stage_ips = the pipeline stage (pool on; serial_ips off); "
                 "zero_ips = the stage with an instant model; plain_ips = threaded preprocessing alone; "
                 "of_bound = stage_ips / min(model_ips, zero_ips)")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (CPU tests)")
    parser.add_argument("--stages", default="embed,mask,caption",
                        help="comma-separated: embed, mask, caption (BLIP-2), caption:qwen2_vl (a chat family)")
    parser.add_argument("--images", type=int, default=None, help="images per stage (default: 512; --tiny 24)")
    parser.add_argument("--caption-images", type=int, default=None, help="captioner images (default: 128; --tiny 16)")
    parser.add_argument("--threads", type=int, default=8, help="prepare_threads and plain-loop threads")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--caption-batch", type=int, default=8)
    parser.add_argument("--embed-batch", type=int, default=32)
    parser.add_argument("--mask-batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--min-seconds", type=float, default=3.0, help="timing window of the model-alone figure")
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None, help="also write the records here, one JSON line each")
    args = parser.parse_args(argv)

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU (use --device cpu --tiny to try the script on CPU)")
    args.work = args.work or tempfile.mkdtemp(prefix="prep-gpu-check-")
    if args.tiny:
        args.min_seconds = min(args.min_seconds, 0.5)
    n = args.images or (24 if args.tiny else 512)
    n_caption = args.caption_images or (16 if args.tiny else 128)
    samples = load_samples(write_images(args.work, "celeba", max(n, n_caption)))
    mask_path = mask_onnx(args.work, args.tiny)
    import onnxruntime as ort

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    header = (f"prep GPU check: {gpu}; torch {torch.__version__}; onnxruntime providers "
              f"{','.join(ort.get_available_providers())}; {os.cpu_count()} CPUs; threads {args.threads}; "
              f"CelebA-size images; random init{' (tiny configs)' if args.tiny else ''}")
    if args.device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
        print("note: onnxruntime has no CUDA provider here (onnxruntime-gpu absent): the mask stage runs on CPU",
              file=sys.stderr, flush=True)
    records = []
    start = time.perf_counter()
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        stage_samples = samples[: n_caption if stage.startswith("caption") else n]
        record = check_stage(stage, args, stage_samples, mask_path)
        record["device"] = args.device
        records.append(record)
        print(f"[gpu_check {time.perf_counter() - start:6.1f}s] {json.dumps(record)}", file=sys.stderr, flush=True)
    table = format_table(records, header)
    print(table, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return records


if __name__ == "__main__":
    from bench.gpu_check import main as _main  # run as the importable module (see handlers())

    _main()
