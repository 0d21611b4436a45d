"""f_a as a network: an attribute probe on the object embeddings prep already computes.

The paper's fine caption is c_f = f_a(x), an attribute classifier's output. prep builds it from
CelebA's label file; the probe gives it to faces without labels (a `folder:` of faces, FFHQ-like
data, CelebA images missing from the attribute file), and it says which labels it doubts.

The probe, per attribute a, on the unit-norm embedding x (float64 arithmetic):

    score_a(x) = x . w_a + b_a                   ridge regression onto labels in {-1, +1}
    p_a(x)     = sigmoid(s_a * score_a(x) + t_a)  Platt scaling, fit on the validation split
    label_a    = p_a(x) >= threshold_a            threshold: the best balanced accuracy on validation

All 40 attributes share one solve: (X'X + lambda n I) W = X'Y over the train split (X with a
column of ones, not regularised), so a fit at CelebA's scale (202,599 x 768) is one Gram
matrix and one Cholesky solve: no iterations, no learning rate, and the same numbers on every
run (`fit` is deterministic for a given input). Balanced accuracy is the measure (CelebA's
labels are skewed: 4% of images are Bald), against the majority baseline, whose balanced
accuracy is 0.5 by definition; plain accuracy is reported too.

Splits: fit on OUT's train split, calibrate, choose thresholds and measure on its validation
split; prep's splits are identity-disjoint, so the figures are on people the probe never saw.
An attribute with fewer than `min_count` positives or negatives in either split is skipped,
and the report says so.

Saved as a folder: `probe.safetensors` (w [D, A], b, s, t: float32; thresholds: float64 [A];
never a pickle) and `probe.json` (format, attribute names, dim, the embedding model's fingerprint,
the report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

PROBE_FORMAT = "prep-attribute-probe-v1"
WEIGHTS_FILE = "probe.safetensors"
META_FILE = "probe.json"
RIDGE = 1e-3  # lambda, per sample (the solve adds lambda * n to the diagonal)
MIN_COUNT = 5  # positives and negatives each split needs for an attribute to be fit
PROBABILITY_DECIMALS = 4  # predicted probabilities as stored in KEY.json


@dataclass
class AttributeProbe:
    names: list[str]
    weights: np.ndarray  # float32 [D, A]
    bias: np.ndarray  # float32 [A]
    scale: np.ndarray  # float32 [A], Platt
    shift: np.ndarray  # float32 [A], Platt
    thresholds: np.ndarray  # float64 [A], on the probability
    embed_model: dict = field(default_factory=dict)  # the embedding model's fingerprint (manifest models.embed)
    report: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.weights.shape[0])

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """float64 [N, A] in [0, 1] for float32 [N, D] (or one [D]) embeddings."""
        x = np.atleast_2d(np.asarray(embeddings, np.float64))
        if x.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {x.shape[1]}; the probe was fit on {self.dim}")
        scores = x @ self.weights.astype(np.float64) + self.bias.astype(np.float64)
        return _sigmoid(self.scale.astype(np.float64) * scores + self.shift.astype(np.float64))

    def predict(self, embedding: np.ndarray) -> tuple[dict[str, bool], dict[str, float]]:
        """(attributes, probabilities) of one embedding, probabilities rounded as stored."""
        p = self.probabilities(embedding)[0]
        rounded = {n: round(float(v), PROBABILITY_DECIMALS) for n, v in zip(self.names, p)}
        return {n: bool(v >= t) for n, v, t in zip(self.names, p, self.thresholds.astype(np.float64))}, rounded

    def save(self, path: str) -> str:
        """PROBE/probe.safetensors and PROBE/probe.json, each written atomically (local or gs://)."""
        from safetensors.numpy import save

        from prep.atomic import write_atomic, write_json

        tensors = {"weights": self.weights, "bias": self.bias, "scale": self.scale, "shift": self.shift,
                   "thresholds": self.thresholds}
        arrays = {k: np.ascontiguousarray(v, np.float64 if k == "thresholds" else np.float32) for k, v in tensors.items()}
        write_atomic(_join(path, WEIGHTS_FILE), save(arrays))
        meta = {"format": PROBE_FORMAT, "names": self.names, "dim": self.dim, "embed_model": self.embed_model,
                "report": self.report}
        write_json(_join(path, META_FILE), meta)
        return path

    @classmethod
    def load(cls, path: str) -> "AttributeProbe":
        """A saved probe, local or on an object store (read through Beam's FileSystems)."""
        from safetensors.numpy import load

        from prep.schemas.output import read_bytes

        meta = read_meta(path)
        t = load(read_bytes(_join(path, WEIGHTS_FILE)))
        probe = cls(names=list(meta["names"]), weights=t["weights"], bias=t["bias"], scale=t["scale"],
                    shift=t["shift"], thresholds=t["thresholds"], embed_model=meta.get("embed_model") or {},
                    report=meta.get("report") or {})
        if probe.weights.shape != (meta["dim"], len(probe.names)):
            raise ValueError(f"{path}: weights {probe.weights.shape} do not fit dim {meta['dim']} and "
                             f"{len(probe.names)} attribute(s)")
        return probe


def _join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def probe_bytes(path: str) -> bytes:
    """probe.json then probe.safetensors, concatenated: what decides the probe's output (the run digest)."""
    from prep.schemas.output import read_bytes

    return read_bytes(_join(path, META_FILE)) + read_bytes(_join(path, WEIGHTS_FILE))


def read_meta(path: str) -> dict:
    """probe.json of a saved probe; ValueError naming what is wrong."""
    from apache_beam.io.filesystems import FileSystems

    from prep.schemas.output import read_bytes

    meta_path = _join(path, META_FILE)
    if not (FileSystems.exists(meta_path) and FileSystems.exists(_join(path, WEIGHTS_FILE))):
        raise ValueError(f"{path} is not a saved attribute probe (expected {META_FILE} and {WEIGHTS_FILE}; "
                         "write one with `prep attributes fit OUT --save PROBE`)")
    meta = json.loads(read_bytes(meta_path).decode("utf-8"))
    if meta.get("format") != PROBE_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {PROBE_FORMAT!r}")
    return meta


def same_embed_model(a: dict, b: dict) -> bool:
    """Two fingerprints (manifest models.embed.fingerprint) name the same weights: equal sha256
    where both have one, else the same id."""
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return bool(a.get("id")) and a.get("id") == b.get("id") and a.get("pretrained") == b.get("pretrained")


def describe_embed_model(fingerprint: dict) -> str:
    name = fingerprint.get("id") or fingerprint.get("path") or fingerprint.get("file") or "?"
    digest = (fingerprint.get("sha256") or "")[:12]
    return f"{name}" + (f" (weights sha256 {digest}...)" if digest else "")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    tpr = (predicted & truth).sum() / max(truth.sum(), 1)
    tnr = (~predicted & ~truth).sum() / max((~truth).sum(), 1)
    return float((tpr + tnr) / 2)


def _platt(scores: np.ndarray, truth: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """(s, t) minimising the log loss of sigmoid(s * score + t) (Newton's method, 2 x 2)."""
    y = truth.astype(np.float64)
    s, t = 1.0, 0.0
    for _ in range(iterations):
        p = _sigmoid(s * scores + t)
        g = np.array([np.sum((p - y) * scores), np.sum(p - y)])
        w = p * (1 - p) + 1e-12
        h = np.array([[np.sum(w * scores * scores), np.sum(w * scores)], [np.sum(w * scores), np.sum(w)]])
        h += 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        s, t = s - step[0], t - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(s), float(t)


def _best_threshold(p: np.ndarray, truth: np.ndarray) -> float:
    """The probability threshold with the best balanced accuracy (ties: the one nearest 0.5),
    among the distinct probabilities (and 0.5): one sort, O(n log n)."""
    truth = truth.astype(bool)
    distinct = np.unique(p)
    # Midpoints between neighbouring probabilities: a threshold never sits on a sample's value,
    # so rounding it (storage) cannot move that sample across it.
    candidates = np.unique(np.concatenate([(distinct[:-1] + distinct[1:]) / 2, distinct[:1], distinct[-1:] + 1e-9, [0.5]]))
    positives, negatives = max(int(truth.sum()), 1), max(int((~truth).sum()), 1)
    # Predicted positive at threshold c: p >= c. Count, per candidate, the samples below it.
    pos_sorted = np.sort(p[truth])
    neg_sorted = np.sort(p[~truth])
    below_pos = np.searchsorted(pos_sorted, candidates, side="left")
    below_neg = np.searchsorted(neg_sorted, candidates, side="left")
    tpr = (len(pos_sorted) - below_pos) / positives
    tnr = below_neg / negatives
    score = np.round((tpr + tnr) / 2, 12)
    best = np.flatnonzero(score == score.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def fit(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, names: Sequence[str], *,
        ridge: float = RIDGE, min_count: int = MIN_COUNT, embed_model: Optional[dict] = None) -> AttributeProbe:
    """The probe from labelled embeddings: x float [N, D], y bool [N, A] (train and validation).

    Attributes with too few positives or negatives (`min_count`, in either split) are left out
    of the probe and listed in its report's `skipped`."""
    train_x, val_x = np.asarray(train_x, np.float64), np.asarray(val_x, np.float64)
    train_y, val_y = np.asarray(train_y, bool), np.asarray(val_y, bool)
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"embeddings must be [N, D] in both splits, got {train_x.shape} and {val_x.shape}")
    counts = {"train": train_y.sum(0), "val": val_y.sum(0)}
    keep, skipped = [], {}
    for a, name in enumerate(names):
        short = [f"{split}: {int(c[a])} positive, {int(len(y) - c[a])} negative"
                 for split, c, y in (("train", counts["train"], train_y), ("val", counts["val"], val_y))
                 if min(c[a], len(y) - c[a]) < min_count]
        if short:
            skipped[name] = f"fewer than {min_count} positives or negatives ({'; '.join(short)})"
        else:
            keep.append(a)
    if not keep:
        raise ValueError(f"no attribute has {min_count} positives and negatives in both splits "
                         f"(train {len(train_y)} samples, val {len(val_y)})")
    n, d = train_x.shape
    xb = np.hstack([train_x, np.ones((n, 1))])
    gram = xb.T @ xb
    gram[np.arange(d), np.arange(d)] += ridge * n  # the bias column is not regularised
    targets = np.where(train_y[:, keep], 1.0, -1.0)
    solution = np.linalg.solve(gram, xb.T @ targets)
    weights, bias = solution[:d], solution[d]
    val_scores = val_x @ weights + bias
    scale, shift, thresholds, rows = [], [], [], {}
    for j, a in enumerate(keep):
        truth = val_y[:, a]
        s, t = _platt(val_scores[:, j], truth)
        p = _sigmoid(s * val_scores[:, j] + t)
        threshold = _best_threshold(p, truth)
        predicted = p >= threshold
        majority = truth.mean() >= 0.5
        scale.append(s), shift.append(t), thresholds.append(threshold)
        rows[names[a]] = {
            "balanced_accuracy": round(balanced_accuracy(truth, predicted), 4),
            "accuracy": round(float((predicted == truth).mean()), 4),
            "majority_accuracy": round(float((truth == majority).mean()), 4),
            "majority_balanced_accuracy": 0.5,
            "held_out": int(len(truth)),
            "held_out_positives": int(truth.sum()),
            "train_positives": int(counts["train"][a]),
            "threshold": round(threshold, 4),
        }
    report = {"attributes": rows, "skipped": skipped, "train_samples": int(n), "val_samples": int(len(val_y)),
              "dim": int(d), "ridge": ridge, "min_count": min_count}
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    return AttributeProbe(names=[names[a] for a in keep], weights=f32(weights), bias=f32(bias), scale=f32(scale),
                          shift=f32(shift), thresholds=np.asarray(thresholds, np.float64), embed_model=dict(embed_model or {}),
                          report=report)


# ----------------------------------------------------------------------------- from an output


def labelled_embeddings(out_dir: str, split: str) -> tuple[np.ndarray, list[dict], list[str]]:
    """(embeddings [N, D], attribute dicts, keys) of OUT's specific samples of `split` that have
    labels (attributes_source "labels" or, in outputs from before it, any attributes)."""
    from prep.schemas import contract
    from prep.schemas.output import iter_folder_samples

    rows: list[tuple[str, np.ndarray, dict]] = []
    for _, raw in iter_folder_samples(out_dir, split, contract.SPECIFIC):
        meta = json.loads(raw[contract.EXT_JSON])
        if meta.get("attributes") and meta.get("attributes_source") != "predicted":
            rows.append((raw["__key__"], contract.load_npy(raw[contract.EXT_EMB]), meta["attributes"]))
    rows.sort(key=lambda r: r[0])
    if not rows:
        return np.zeros((0, 0), np.float32), [], []
    return np.stack([r[1] for r in rows]), [r[2] for r in rows], [r[0] for r in rows]


def fit_output(out_dir: str, *, ridge: float = RIDGE, min_count: int = MIN_COUNT,
               attributes: Optional[Iterable[str]] = None) -> AttributeProbe:
    """Fit on OUT's train split, calibrate and measure on its val split (see `fit`)."""
    from prep.schemas import contract

    from prep.schemas.output import read_manifest

    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{out_dir}: no readable {contract.MANIFEST}: not a complete output of `prep run`")
    train_x, train_attrs, _ = labelled_embeddings(out_dir, contract.TRAIN)
    val_x, val_attrs, _ = labelled_embeddings(out_dir, "val")
    if not train_attrs:
        raise ValueError(f"{out_dir}: no labelled specific sample in the train split")
    if not val_attrs:
        raise ValueError(f"{out_dir}: no labelled specific sample in the val split; the probe is measured on "
                         "held-out identities (rerun prep with --val-fraction 0.1, or a CelebA partition file)")
    names = list(attributes) if attributes else sorted({n for a in train_attrs for n in a})
    missing = [n for n in names if not any(n in a for a in train_attrs)]
    if missing:
        raise ValueError(f"{out_dir} has no label for {', '.join(missing)}")

    def matrix(attrs: list[dict]) -> np.ndarray:
        return np.array([[bool(a.get(n, False)) for n in names] for a in attrs], bool)

    embed_model = ((manifest.get("models") or {}).get("embed") or {}).get("fingerprint") or {}
    probe = fit(train_x, matrix(train_attrs), val_x, matrix(val_attrs), names, ridge=ridge, min_count=min_count,
                embed_model=embed_model)
    test_x, test_attrs, _ = labelled_embeddings(out_dir, "test")
    if test_attrs:  # thresholds were chosen on val: the test split is the unbiased figure
        measure(probe, test_x, matrix(test_attrs), names, "test")
    return probe


def measure(probe: AttributeProbe, x: np.ndarray, y: np.ndarray, names: Sequence[str], split: str) -> None:
    """Adds `<split>_balanced_accuracy`, `<split>_accuracy` and `<split>_samples` to each
    attribute's report row: the probe as fit, on samples it was neither fit nor tuned on."""
    p = probe.probabilities(x)
    for j, name in enumerate(probe.names):
        truth = y[:, list(names).index(name)]
        predicted = p[:, j] >= float(probe.thresholds[j])
        row = probe.report["attributes"][name]
        both = bool(truth.any() and (~truth).any())  # balanced accuracy needs both classes
        row[f"{split}_balanced_accuracy"] = round(balanced_accuracy(truth, predicted), 4) if both else None
        row[f"{split}_accuracy"] = round(float((predicted == truth).mean()), 4)
        row[f"{split}_positives"] = int(truth.sum())
    probe.report[f"{split}_samples"] = int(len(y))


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(probe: AttributeProbe) -> str:
    r = probe.report
    test = "test_samples" in r
    lines = [f"attribute probe: {len(probe.names)} attribute(s), fit on {r['train_samples']} train samples; "
             f"thresholds chosen and measured on {r['val_samples']} val samples"
             + (f", measured again on {r['test_samples']} test samples" if test else "")
             + f" (other identities); dim {r['dim']}",
             f"{'attribute':22s} {'bal.acc':>7s} {'majority':>8s} {'acc':>6s} {'maj.acc':>7s} {'held-out':>8s} {'pos':>5s}"
             + (f" {'test bal.acc':>12s} {'test pos':>8s}" if test else "")]
    for name, row in r["attributes"].items():
        lines.append(f"{name:22s} {row['balanced_accuracy']:7.3f} {row['majority_balanced_accuracy']:8.3f} "
                     f"{row['accuracy']:6.3f} {row['majority_accuracy']:7.3f} {row['held_out']:8d} "
                     f"{row['held_out_positives']:5d}"
                     + (f" {_fmt(row['test_balanced_accuracy']):>12s} {row['test_positives']:8d}" if test else ""))
    for name, why in r["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)
