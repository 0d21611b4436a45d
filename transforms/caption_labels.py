"""Words of the VLM caption that contradict the sample's own attribute labels (CelebA's 40).

A small lexicon, phrase by phrase: "wearing glasses" where Eyeglasses is -1, "a smiling man"
where Male is -1 or Smiling is -1, "bearded" where No_Beard is 1, ... Each finding names the
attribute, its label and the words; the sample keeps them (`caption_contradictions` in its
JSON), the manifest counts them per attribute and `prep inspect` lists them with thumbnails.
Labels are never changed: a finding is a question for a person (the label, or the captioner,
may be the wrong one).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

# (attribute, the label value the words contradict, pattern). Word boundaries throughout:
# "woman" never matches "man". A negation just before a word ("no beard", "without glasses")
# is handled by NEGATED, which flips what the words say.
LEXICON: tuple[tuple[str, bool, str], ...] = (
    ("Eyeglasses", False, r"(?:eye)?glasses|spectacles|sunglasses"),
    ("No_Beard", True, r"beard|bearded"),
    ("Mustache", False, r"mustache|moustache"),
    ("Smiling", False, r"smiling|smiles|smile|grinning|grins|laughing"),
    ("Wearing_Hat", False, r"hat|cap|beanie|fedora|beret"),
    ("Bald", False, r"bald|balding"),
    ("Blond_Hair", False, r"blond|blonde"),
    ("Black_Hair", False, r"black hair|black-haired"),
    ("Brown_Hair", False, r"brown hair|brown-haired|brunette"),
    ("Male", True, r"woman|women|girl|lady|female|she|her"),
    ("Male", False, r"man|men|boy|gentleman|male|he|his|guy"),
)
NEGATED = re.compile(r"\b(?:no|without|not wearing|not|isn't|is not)\s+(?:a\s+|any\s+)?$", re.IGNORECASE)
_COMPILED = tuple((attr, label, re.compile(rf"\b(?:{words})\b", re.IGNORECASE)) for attr, label, words in LEXICON)


def contradictions(caption: Optional[str], attributes: Optional[Mapping[str, object]]) -> tuple[dict, ...]:
    """[{"attribute", "label", "words"}] for each lexicon phrase of `caption` that its label
    contradicts (labels as booleans or CelebA's 1/-1; an attribute without a label says
    nothing). One finding per (attribute, label)."""
    if not caption or not attributes:
        return ()
    found: dict[tuple[str, bool], dict] = {}
    for attr, contradicted, pattern in _COMPILED:
        value = attributes.get(attr)
        if value is None:
            continue
        label = bool(value > 0) if not isinstance(value, bool) else value
        for match in pattern.finditer(caption):
            negation = NEGATED.search(caption[: match.start()])
            # The words assert the opposite of `contradicted`'s label; negated, they assert it.
            if (label == contradicted) != bool(negation) and (attr, label) not in found:
                start = negation.start() if negation else match.start()
                found[(attr, label)] = {"attribute": attr, "label": label, "words": caption[start:match.end()]}
    return tuple(found.values())
