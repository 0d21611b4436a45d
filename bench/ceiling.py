"""Zero-cost-model benchmark: the most images/s a GPU could ever get from each model stage.

Each model stage (caption, mask, embed) runs with its real preprocessing (`prepare`, and the
host-side work of `infer`: stacking, mask binarising and PNG encoding, caption decoding) and
a model that returns at once. Against it, a plain threaded loop runs only the same
per-element preprocessing over the same images on `--threads` threads, with no Beam.
  plain_ips   the plain threaded loop (the preprocessing-bound ceiling of any feeder)
  stage_ips   the stage as the pipeline runs it (ModelStage = RunInference + dead-letter
              routing on Beam's in-memory runner), net of Beam's fixed start-up, which is
              measured on the same pipeline over one batch and subtracted (raw: stage_raw_ips)
  pool        whether the stage prepares on its thread pool (prepare_threads=--threads) or
              serially on the model's thread (prepare_threads=1)
  plumbing_ips  the pooled stage with no host work (prepare and finish hand back one element's
              values, computed once): Beam's per-element cost and the per-batch model call
  rounds      each variant runs once per round in a fresh process, the rounds interleaved (a
              slow spell of the host falls on every variant); figures are medians, *_range the
              spread
  decoded     off (default): each stage decodes the JPEG itself, as before decode-once; on: the
              pixels are already decoded (as the pipeline's Decode step leaves them in
              transforms.decode.DECODED), so the stage's work is what is left of it in a run
  family      the caption stage's family: blip-2 (default; its image processor alone, per image)
              or qwen2_vl (a chat family: Qwen2-VL's real image processor and prep demo-models'
              chat template; the full processor per image with the template's text, collated
              with left padding on the model's thread)
Images: CelebA size (178x218) and web size (1024x768), synthetic JPEGs (quality 95) with an
elliptical mask. Each variant runs in a fresh process (see bench/stages.py for why). Prints
one JSON line per (stage, size, pool): {"stage", "size", "pool", "plain_ips", "stage_ips", ...}.

    python -m bench.ceiling                              # ~12 min on 2 idle cores (3 rounds)
    python -m bench.ceiling --stages embed --sizes web --threads 8
    python -m bench.ceiling --decoded on                 # the stages as a run feeds them
    python -m bench.ceiling --stages caption --caption-family qwen2_vl   # a chat family
Targets (2 cores): stage_ips >= 0.9 x plain_ips; web size: pool on >= 1.6 x pool off.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = {"celeba": (178, 218), "web": (1024, 768)}
DEFAULT_IMAGES = {"celeba": 1536, "web": 128}
BATCH = {"caption": 8, "mask": 8, "embed": 32}
CLIP_IMAGE_SIZE = 224  # ViT-L-14's input
BLIP2_IMAGE_SIZE = 224  # BLIP-2's image processor


# -- inputs --------------------------------------------------------------------------------

def write_images(work: str, size: str, n: int) -> str:
    """n synthetic JPEGs of one size (smooth colour fields plus noise: realistic entropy)."""
    from PIL import Image

    folder = os.path.join(work, f"{size}-{n}")
    if len(glob.glob(os.path.join(folder, "*.jpg"))) == n:
        return folder
    os.makedirs(folder, exist_ok=True)
    w, h = SIZES[size]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0.002, 0.02, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b + 2 * i), np.sin((xx + yy) * c)], axis=-1)
        arr = ((base + 1) * 110 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i:05d}.jpg"), format="JPEG", quality=95)
    return folder


def load_samples(folder: str):
    """Samples as the model stages see them: an upright RGB JPEG and a binary PNG mask."""
    from PIL import Image, ImageDraw

    from prep.schemas.records import Sample
    from prep.transforms.decode import decode_image
    from prep.transforms.mask import mask_png

    samples = []
    for i, path in enumerate(sorted(glob.glob(os.path.join(folder, "*.jpg")))):
        with open(path, "rb") as f:
            jpeg, w, h = decode_image(f.read())
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).ellipse((w // 5, h // 6, 4 * w // 5, 5 * h // 6), fill=255)
        samples.append(Sample(key=f"k{i:06d}", source="bench", domain="specific", path=path, identity=str(i % 7),
                              image_jpeg=jpeg, width=w, height=h, mask_png=mask_png(np.asarray(mask))))
    return samples


# -- zero-cost models: the stage's own code around a model that returns at once --------------

def blip2_processor(image_size: int = BLIP2_IMAGE_SIZE, vocab_size: int = 0):
    """A BLIP-2-shaped processor built offline: BLIP-2's image processor (224 px, bicubic,
    CLIP mean/std) and a word-level tokenizer (captions' text does not matter here) with at
    least `vocab_size` entries, so that any id a random-init model emits decodes to a word."""
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "person", "face"]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    folder = tempfile.mkdtemp(prefix="prep-vocab-")
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    tokenizer = BertTokenizer(os.path.join(folder, "vocab.txt"), do_lower_case=True)
    image = BlipImageProcessor(size={"height": image_size, "width": image_size},
                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])
    return BlipProcessor(image_processor=image, tokenizer=tokenizer)


class _InstantCaptioner:
    """Stands where LoadedCaptioner stands: `generate` returns 'a photo of a face' at once, after
    the prompt's ids where there is a prompt (decoder-only families return prompt + answer)."""

    def __init__(self, tokenizer, max_new_tokens: int):
        ids = tokenizer("a photo of a face", add_special_tokens=False)["input_ids"]
        self.row = (ids * max_new_tokens)[:max_new_tokens]

    def generate(self, inputs: dict, **kwargs):
        import torch

        prompt = inputs.get("input_ids")
        rows = torch.tensor([self.row] * (len(prompt) if prompt is not None else len(inputs["pixel_values"])))
        return rows if prompt is None else torch.cat([prompt, rows], dim=1)

    def eos_ids(self) -> list[int]:
        return []  # never ends: every row is the full max_new_tokens, as the GPU check's captioner


class _InstantSession:
    """Stands where a rembg session stands: the soft mask (an ellipse) at the image's size."""

    def __init__(self):
        self._cache: dict = {}

    def predict(self, image):
        from PIL import Image, ImageDraw

        if image.size not in self._cache:
            w, h = image.size
            soft = Image.new("L", (w, h), 0)
            ImageDraw.Draw(soft).ellipse((w // 5, h // 6, 4 * w // 5, 5 * h // 6), fill=230)
            self._cache[image.size] = soft
        return [self._cache[image.size]]


CAPTION_FAMILIES = ("blip-2", "qwen2_vl")


def chat_processor(work: str) -> str:
    """The chat family's processor, saved once under `work` for every variant's process."""
    from bench.stages import real_qwen2_vl_processor

    folder = os.path.join(work, "qwen2_vl-processor")
    if not os.path.isfile(os.path.join(folder, "processor_config.json")):
        real_qwen2_vl_processor(os.path.join(work, "qwen2_vl-build")).save_pretrained(folder)
    return folder


def zero_cost_handler(stage: str, prepare_threads: int, batch: int | None = None, family: str = "blip-2",
                      processor_dir: str | None = None):
    """The stage's real handler class, with only the model replaced by an instant one."""
    from prep.transforms.caption import CaptionHandler
    from prep.transforms.captioners import family_of
    from prep.transforms.embed import EmbedHandler, LoadedClip
    from prep.transforms.mask import MaskHandler

    batch = batch or BATCH[stage]
    if stage == "caption":
        if family == "blip-2":
            processor = blip2_processor()
        else:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(processor_dir)
            processor.tokenizer.padding_side = family_of(family).padding_side

        class ZeroCaption(CaptionHandler):
            def processor(self):
                return processor

            def family(self):
                return family_of(family)

            def load_model(self):
                return _InstantCaptioner(processor.tokenizer, self.max_new_tokens)

        return ZeroCaption("zero-cost", max_new_tokens=20, device="cpu", max_batch_size=batch,
                           prepare_threads=prepare_threads, on_bad="keep")  # its text loops: kept, as real work
    if stage == "embed":
        from open_clip import image_transform

        class ZeroEmbed(EmbedHandler):
            def load_model(self):
                return LoadedClip(None, image_transform(CLIP_IMAGE_SIZE, is_train=False), "cpu")

            def infer(self, prepared, model):
                model.batch(prepared)  # the host-side work of the real infer (the rest is the device's)
                unit = np.zeros((768,), np.float32)
                unit[0] = 1.0
                return [unit] * len(prepared)

        return ZeroEmbed("zero-cost", None, device="cpu", max_batch_size=batch, prepare_threads=prepare_threads)
    if stage == "mask":
        class ZeroMask(MaskHandler):
            def load_model(self):
                return _InstantSession()

        return ZeroMask("zero-cost", device="cpu", max_batch_size=batch, prepare_threads=prepare_threads)
    raise SystemExit(f"unknown stage {stage!r}")


# -- the two ways to run it -----------------------------------------------------------------

def plain_loop(handler, samples, threads: int) -> tuple[float, int]:
    """Only the per-element host work (prepare, and finish on the instant model's output),
    mapped over the images on `threads` threads."""
    from concurrent.futures import ThreadPoolExecutor

    from prep.transforms.caption import new_tokens

    model = handler.load_model()
    # The instant model per image where the stage has host work on its output: the mask
    # session's soft mask (binarised, PNG-encoded), the captioner's token ids (decoded).
    one = getattr(model, "predict", None)
    captioner = handler.stage == "caption"
    if captioner:
        handler.prompt_text()  # the chat template around the instruction: made once, before the clock starts

    def work(sample):
        prepared = handler.prepare(sample, model)
        if captioner:
            ids = new_tokens(model.generate(prepared), prepared.get("input_ids"))[0]
            return handler.finish((ids, False))  # (ids, cut)
        return handler.finish(one(prepared)[0]) if one else prepared

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(1 for _ in pool.map(work, samples))
    return time.perf_counter() - start, n


def beam_stage(handler, samples) -> tuple[float, int]:
    """Wall seconds of ModelStage over the samples on the in-memory runner, and the ok count.

    The graph carries only keys, looked up in this process (`bench.common.feed_by_key`)."""
    from bench.stages import pipeline_stage

    _, n, wall, _ = pipeline_stage(handler, samples)
    return wall, n


def stage_timing(handler, samples) -> dict:
    """ModelStage over the samples, with Beam's fixed start-up measured on one batch first."""
    small = samples[: handler.max_batch_size]
    beam_stage(handler, small)  # warm: imports and first-use costs
    fixed, _ = beam_stage(handler, small)
    wall, n = beam_stage(handler, samples)
    # Net of start-up: the run over one batch took `fixed`; the images beyond it took wall - fixed.
    if n >= 2 * len(small) and wall - fixed > 0.25 * wall:
        net_ips = (n - len(small)) / (wall - fixed)
    else:  # too few images to separate start-up from the work: the raw figure
        net_ips = n / wall
    return {"wall": wall, "fixed": fixed, "n": n, "net_ips": net_ips}


def run_child(spec: dict) -> dict:
    import torch

    from prep.transforms.decode import DECODED, load_rgb

    torch.set_num_threads(spec["torch_threads"])
    samples = load_samples(spec["folder"])
    if spec.get("decoded"):  # what Decode leaves for the stages after it (nothing is evicted)
        DECODED.configure(1 << 20)
        for sample in samples:
            load_rgb(sample.image_jpeg)
    else:  # the same images go through several times here: every pass decodes, as a stage alone does
        DECODED.configure(0)
    if spec["variant"] == "plain":
        handler = zero_cost_handler(spec["stage"], 1, family=spec["family"], processor_dir=spec["processor_dir"])
        seconds, n = plain_loop(handler, samples, spec["threads"])
        return {"seconds": seconds, "n": n}
    handler = zero_cost_handler(spec["stage"], spec["threads"] if spec["variant"] in ("pool", "plumbing") else 1,
                                family=spec["family"], processor_dir=spec["processor_dir"])
    if spec["variant"] == "plumbing":
        handler = without_host_work(handler, samples[0])
    return stage_timing(handler, samples)


_CONSTANT: dict = {}  # stage -> (prepared, finished): looked up in this process, never in the pickled graph


def without_host_work(handler, sample):
    """The pooled stage with its per-element host work gone: `prepare` and `finish` hand back one
    element's prepared value and finished output, computed once. What is left is Beam's
    per-element cost (RunInference, dead-letter routing) and the per-batch model call."""
    model = handler.load_model()
    prepared = handler.prepare(sample, model)
    _CONSTANT[handler.stage] = (prepared, handler.finish(handler._infer_fixed([prepared], model)[0]))
    base = type(handler)

    class NoHostWork(base):
        # (The module's dict by import, at run time: a global named here would be pickled with
        # this local class, values and all.)
        def prepare(self, sample, model):
            from bench import ceiling

            return ceiling._CONSTANT[self.stage][0]

        def finish(self, output):
            from bench import ceiling

            return ceiling._CONSTANT[self.stage][1]

    handler.__class__ = NoHostWork
    return handler


def measure(stage: str, size: str, folder: str, n: int, threads: int, torch_threads: int,
            decoded: bool = False, rounds: int = 3, family: str = "blip-2", processor_dir: str | None = None
            ) -> list[dict]:
    """`rounds` rounds of four fresh processes (plain, pool off, pool on, plumbing), interleaved so that a
    slow spell of the host falls on every variant; two JSON records (pool off, pool on) with the
    median img/s of the rounds and their spread."""
    runs: dict[str, list[dict]] = {"plain": [], "serial": [], "pool": [], "plumbing": []}
    for _ in range(rounds):
        for variant in runs:
            spec = {"stage": stage, "folder": folder, "variant": variant, "threads": threads,
                    "torch_threads": torch_threads, "decoded": decoded, "family": family,
                    "processor_dir": processor_dir}
            out = subprocess.run([sys.executable, "-m", "bench.ceiling", "--child", json.dumps(spec)],
                                 check=True, capture_output=True, text=True).stdout
            result = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
            if result["n"] != n:
                raise SystemExit(f"{stage}/{size}/{variant}: {result['n']} of {n} images came through")
            runs[variant].append(result)
    plain = [n / r["seconds"] for r in runs["plain"]]
    plain_ips = float(np.median(plain))
    records = []
    for variant in ("serial", "pool"):
        ips = [r["net_ips"] for r in runs[variant]]
        net_ips = float(np.median(ips))
        records.append({
            "stage": stage, "size": size, "pool": variant == "pool", "decoded": decoded,
            **({"family": family} if stage == "caption" else {}),
            "threads": threads if variant == "pool" else 1,
            "images": n, "rounds": rounds, "plain_ips": round(plain_ips, 1), "stage_ips": round(net_ips, 1),
            "ratio": round(net_ips / plain_ips, 3),
            "plain_range": [round(min(plain), 1), round(max(plain), 1)],
            "stage_range": [round(min(ips), 1), round(max(ips), 1)],
            "stage_raw_ips": round(float(np.median([n / r["wall"] for r in runs[variant]])), 1),
            "startup_s": round(float(np.median([r["fixed"] for r in runs[variant]])), 2),
        })
    # The stage with no host work at all: Beam's per-element cost and the per-batch model call,
    # on the model's thread; the most any preprocessing could leave the stage.
    plumbing_ips = float(np.median([r["net_ips"] for r in runs["plumbing"]]))
    for record in records:
        record["plumbing_ips"] = round(plumbing_ips, 1)
    records[1]["pool_speedup"] = round(records[1]["stage_ips"] / records[0]["stage_ips"], 2)
    return records


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="embed,caption,mask")
    parser.add_argument("--sizes", default="celeba,web")
    parser.add_argument("--images", type=int, default=None, help="images per size (default celeba 1536, web 128)")
    parser.add_argument("--threads", type=int, default=4, help="plain loop threads = the stage's prepare_threads")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads in each process")
    parser.add_argument("--decoded", choices=("off", "on"), default="off",
                        help="on: images already decoded, as the pipeline's Decode step leaves them")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of fresh processes per variant; the median is reported")
    parser.add_argument("--caption-family", choices=CAPTION_FAMILIES, default="blip-2",
                        help="the caption stage's family: blip-2, or qwen2_vl (a chat family)")
    parser.add_argument("--work", default=None, help="scratch folder for the images (default: a temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return []
    work = args.work or tempfile.mkdtemp(prefix="prep-ceiling-")
    records = []
    processor_dir = chat_processor(work) if args.caption_family != "blip-2" and "caption" in args.stages else None
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        n = args.images or DEFAULT_IMAGES[size]
        folder = write_images(work, size, n)
        for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
            for record in measure(stage, size, folder, n, args.threads, args.torch_threads, args.decoded == "on",
                                  args.rounds, args.caption_family, processor_dir):
                print(json.dumps(record), flush=True)
                records.append(record)
    return records


if __name__ == "__main__":
    # Run as the importable module: the graph then pickles bench.common.lookup by name (as __main__ it
    # would pickle it by value, with every image in _BY_KEY).
    from bench.ceiling import main as _main

    _main()
