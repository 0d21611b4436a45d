"""Evaluation: the paper's object similarity and text similarity, per (reference, prompt).

For each reference image and each prompt, `num_samples` images are generated (conditioned on
the reference's object embedding, computed by the pipeline's mask + embed steps), then:

- object similarity: mean cosine between the CLIP image embeddings of the reference image and
  of each generated image (higher: the object is kept);
- text similarity: mean cosine between the CLIP text embedding of the prompt and the CLIP
  image embedding of each generated image (higher: the prompt is followed).

Scoring uses the checkpoint's CLIP (the pipeline's). The paper scores with a large CLIP: with
this tiny training setup the numbers only compare checkpoints, they are not the paper's.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from prep.trainer.sample import Customizer, SampleParams, make_grid


def evaluate(
    checkpoint: str,
    references: Sequence[str],
    prompts: Sequence[str],
    *,
    params: SampleParams = SampleParams(),
    device: str = "auto",
    out_dir: Optional[str] = None,
) -> list[dict[str, Any]]:
    """One row per (reference, prompt): {'reference', 'prompt', 'samples', 'object_sim', 'text_sim',
    'random_clip'} (random_clip: the scoring CLIP has random weights, see `random_clip_note`)."""
    if not references or not prompts:
        raise ValueError("need at least one reference and one prompt")
    customizer = Customizer(checkpoint, device=device)
    rows = []
    for r, path in enumerate(references):
        ref = customizer.reference(path)
        ref_feature = customizer.embed_images([ref.image])
        for p, prompt in enumerate(prompts):
            images = customizer.generate(ref.embedding, prompt, params)
            features = customizer.embed_images(images)
            rows.append({
                "reference": path,
                "prompt": prompt,
                "samples": len(images),
                "object_sim": float((features @ ref_feature.T).mean()),
                "text_sim": float((features @ customizer.embed_texts([prompt]).T).mean()),
                "random_clip": customizer.random_clip,
            })
            if out_dir:
                os.makedirs(out_dir, exist_ok=True)
                make_grid([ref.image, ref.masked, *images], customizer.image_size).save(
                    os.path.join(out_dir, f"ref{r:03d}_prompt{p:03d}.png")
                )
    return rows


def random_clip_note(rows: Sequence[dict[str, Any]]) -> Optional[str]:
    """One line when the CLIP that scored the rows has random weights (the tiny preset)."""
    if not any(r.get("random_clip") for r in rows):
        return None
    return ("random weights: the CLIP model that embeds the references and scores the samples was built at random, "
            "so object_sim and text_sim say nothing about quality; use --preset small or paper for real ones")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the rows, with a mean row when there are several."""
    table = [
        [os.path.basename(r["reference"]), r["prompt"], str(r["samples"]), f"{r['object_sim']:.4f}", f"{r['text_sim']:.4f}"]
        for r in rows
    ]
    if len(rows) > 1:
        means = [sum(r[k] for r in rows) / len(rows) for k in ("object_sim", "text_sim")]
        table.append(["mean", "", str(sum(r["samples"] for r in rows)), f"{means[0]:.4f}", f"{means[1]:.4f}"])
    header = ["reference", "prompt", "n", "object_sim", "text_sim"]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    lines = [header, ["-" * w for w in widths], *table]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in lines)
