"""Identity-step benchmark: the face stage in a Beam pipeline against a plain loop of the same calls.

Images are the real photos of ../shared/data/faces (and the two real CelebA crops), repeated
to --images, at two sizes:
  celeba: a 178x218 crop around each face (CelebA's aligned size);
  web:    the whole photo scaled so its longer side is 1,000 px.
(a) plain:    decode, pixel digest, perceptual hash, detect + landmarks + descriptor per image;
(b) pipeline: `ModelStage(IdentityHandler)` on Beam's in-memory runner, fed the same Samples.
Each variant runs in a fresh process; model loading is excluded from both. One JSON line per size:
  {"size", "images", "plain_ips", "pipeline_ips", "ratio", "faces_per_image"}

    python -m bench.identity                   # ~1.5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZES = ("celeba", "web")


def _photos() -> list[Path]:
    found = sorted((SHARED / "faces" / "people").glob("*/*")) + sorted((SHARED / "celeba" / "img_align_celeba").glob("*.jpg"))
    if not found:
        raise SystemExit(f"no photos under {SHARED}: this benchmark needs ../shared/data/faces")
    return found


def make_samples(size: str, n: int):
    from PIL import Image, ImageOps

    from prep.schemas.records import Sample
    from prep.transforms.decode import decode_image
    from prep.transforms.faces import FaceDetector

    detector = FaceDetector() if size == "celeba" else None
    encoded = []
    for path in _photos():
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        if size == "celeba":
            shapes = detector.detect(np.asarray(img))
            if shapes:  # CelebA-like: the face in the upper middle of a 178x218 crop
                r = shapes[0].rect
                cx, cy, side = (r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2, r.width() * 2.0
                box = (cx - side / 2, cy - side * 0.55, cx + side / 2, cy + side * 0.68)
                img = img.crop(tuple(int(round(v)) for v in box))
            img = img.resize((178, 218), Image.Resampling.LANCZOS)
        else:
            scale = 1000 / max(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        encoded.append((path, buf.getvalue()))
    samples = []
    for i in range(n):
        path, raw = encoded[i % len(encoded)]
        jpeg, w, h = decode_image(raw)
        samples.append(Sample(key=f"k{i:06d}", source="bench", domain="specific", path=str(path), identity=path.parent.name,
                              image_jpeg=jpeg, width=w, height=h))
    return samples


def plain_loop(handler, samples) -> tuple[float, int, int]:
    from prep.transforms.decode import load_rgb
    from prep.transforms.faces import find_faces
    from prep.transforms.identity import perceptual_hash, pixel_digest

    model = handler.load_model()
    start = time.perf_counter()
    done = faces = 0
    for s in samples:
        image = load_rgb(s.image_jpeg)
        pixels = np.asarray(image, np.uint8)
        pixel_digest(pixels)
        perceptual_hash(image)
        found = find_faces(pixels, *model.get())
        faces += len(found)
        done += 1
    return time.perf_counter() - start, done, faces


def run_child(variant: str, size: str, n: int) -> dict:
    from prep.transforms.identity import FACE, IdentityHandler, NO_FACE_KEEP

    samples = make_samples(size, n)
    handler = IdentityHandler(FACE, device="cpu", no_face=NO_FACE_KEEP)
    if variant == "plain":
        seconds, done, faces = plain_loop(handler, samples)
        return {"seconds": seconds, "n": done, "faces": faces}
    from bench.stages import pipeline_stage

    seconds, done, wall, load_s = pipeline_stage(handler, samples)
    return {"seconds": seconds, "n": done, "wall": wall, "load": load_s}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="images per size (default: celeba 192, web 48)")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # VARIANT:SIZE:N
    args = parser.parse_args(argv)
    if args.child:
        variant, size, n = args.child.split(":")
        print("RESULT " + json.dumps(run_child(variant, size, int(n))), flush=True)
        return
    defaults = {"celeba": 192, "web": 48}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for size in [s for s in args.sizes.split(",") if s]:
        n = args.images or defaults[size]
        results = {}
        for variant in ("plain", "pipeline"):
            cmd = [sys.executable, "-m", "bench.identity", "--child", f"{variant}:{size}:{n}"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[variant] = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
        plain, pipe = results["plain"], results["pipeline"]
        if plain["n"] != n or pipe["n"] != n:
            raise SystemExit(f"{size}: lost images (plain {plain['n']}, pipeline {pipe['n']} of {n})")
        plain_ips, pipe_ips = n / plain["seconds"], n / pipe["seconds"]
        print(json.dumps({
            "size": size, "images": n, "plain_ips": round(plain_ips, 2), "pipeline_ips": round(pipe_ips, 2),
            "ratio": round(pipe_ips / plain_ips, 3), "faces_per_image": round(plain["faces"] / n, 2),
            "pipeline_wall_s": round(pipe["wall"], 2), "model_load_s": round(pipe["load"], 2),
        }), flush=True)


if __name__ == "__main__":
    main()
