"""`prep run --attribute-model PROBE`: the attribute probe (models/attribute_probe.py) on the
object embedding of each specific sample of a face input kind (`--attribute-kinds`, default
celeba and folder; never an object photo unless asked), right after the embed stage.

- A sample without labels gets the predicted attributes (`attributes_source` "predicted") and an
  attribute caption made from them exactly as label-made captions are (transforms/attributes.py),
  joined after its VLM caption: c_f = f_a(x), the paper's fine caption.
- A sample with labels keeps them (`attributes_source` "labels"; labels are never changed). Where
  the probe gives the opposite of a label with probability >= `doubt` (p >= doubt for a label
  False, p <= 1 - doubt for a label True), the label is doubted: `attribute_doubts` lists
  {attribute, label, probability}; the manifest counts them per attribute and `prep inspect`
  shows them.
- Every sample the probe saw records `attribute_probabilities` (rounded to 4 decimals).
"""

from __future__ import annotations

from typing import Iterator

import apache_beam as beam

from prep.models.attribute_probe import AttributeProbe
from prep.schemas.records import Sample
from prep.transforms.attributes import add_attribute_caption
from prep.transforms.common import counter

PREDICTED, LABELS = "predicted", "labels"


def doubts(attributes: dict, probabilities: dict[str, float], doubt: float) -> tuple[dict, ...]:
    """The labels the probe contradicts with at least `doubt` confidence, in attribute order."""
    found = []
    for name, p in sorted(probabilities.items()):
        label = attributes.get(name)
        if label is None:
            continue
        if (label and p <= 1 - doubt) or (not label and p >= doubt):
            found.append({"attribute": name, "label": bool(label), "probability": p})
    return tuple(found)


def apply_probe(sample: Sample, probe: AttributeProbe, doubt: float, sep: str) -> Sample:
    if sample.embedding is None:
        return sample
    predicted, probabilities = probe.predict(sample.embedding)
    if not sample.attributes:
        with_labels = sample.with_(attributes=predicted, attributes_source=PREDICTED,
                                   attribute_probabilities=probabilities)
        # The caption is rebuilt as labels build it; the VLM-against-labels check is for labels only.
        return add_attribute_caption(with_labels, sep).with_(caption_contradictions=())
    return sample.with_(attributes_source=LABELS, attribute_probabilities=probabilities,
                        attribute_doubts=doubts(sample.attributes, probabilities, doubt))


class ApplyAttributeProbe(beam.DoFn):
    """Specific samples -> the same samples with predicted or checked attributes (see above).
    The probe (a few KB to a few hundred KB) is loaded once per DoFn instance."""

    def __init__(self, path: str, doubt: float, sep: str, kinds: frozenset[str] = frozenset({"celeba", "folder"})):
        self._path, self._doubt, self._sep, self._kinds = path, doubt, sep, frozenset(kinds)
        self._probe = None
        self._predicted = counter("attributes", "predicted")
        self._checked = counter("attributes", "checked")
        self._doubted = counter("attributes", "doubted")
        self._other = counter("attributes", "not_faces")

    def setup(self):
        self._probe = AttributeProbe.load(self._path)

    def process(self, sample: Sample) -> Iterator[Sample]:
        if sample.source not in self._kinds:  # not faces (lsun: objects): a face probe says nothing of them
            self._other.inc()
            yield sample
            return
        out = apply_probe(sample, self._probe, self._doubt, self._sep)
        if out.attributes_source == PREDICTED:
            self._predicted.inc()
        elif out.attributes_source == LABELS:
            self._checked.inc()
            if out.attribute_doubts:
                self._doubted.inc()
        yield out
