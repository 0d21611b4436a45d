"""CelebA attribute labels turned into an English caption, and the caption join.

The paper's training captions for face images are "VLM caption + attribute caption": a caption
written by a vision-language model, followed by a sentence built from the image's 40 CelebA
attribute labels. This module builds that second sentence and joins the two.

`attribute_caption` is a pure, deterministic function of the labels, so a sample's caption is
the same in every run and on every worker:

    >>> attribute_caption({"Smiling": True, "Young": True, "Wavy_Hair": True,
    ...                    "Blond_Hair": True, "Wearing_Earrings": True, "Male": False})
    'a smiling young woman with wavy blond hair, wearing earrings'

Every one of the 40 labels changes the text when it is flipped (tests check this), so no label
is silently dropped from the caption.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

from prep.schemas.records import Sample

__all__ = ["CELEBA_ATTRIBUTES", "AttributeValue", "add_attribute_caption", "attribute_caption", "join_captions"]

# A label as the pipeline carries it (bool) or as CelebA's file writes it (1 / -1).
AttributeValue = Union[bool, int, None]

# The 40 attribute names in the column order of CelebA's list_attr_celeba.txt.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

# Adjectives before the age word, in this order: "an attractive smiling chubby ... young man".
_LEADING_ADJECTIVES: tuple[tuple[str, str], ...] = (
    ("Attractive", "attractive"),
    ("Smiling", "smiling"),
    ("Chubby", "chubby"),
    ("Pale_Skin", "pale-skinned"),
    ("Bald", "bald"),
)
_HAIR_TEXTURES: tuple[tuple[str, str], ...] = (("Wavy_Hair", "wavy"), ("Straight_Hair", "straight"))
_HAIR_COLOURS: tuple[tuple[str, str], ...] = (
    ("Black_Hair", "black"),
    ("Blond_Hair", "blond"),
    ("Brown_Hair", "brown"),
    ("Gray_Hair", "gray"),
)
# Features listed after "with", as (label, noun phrase), used in the order of
# `attribute_caption`. Eyebrow and nose labels share one noun each ("a big pointy nose").
_HEAD_FEATURES: tuple[tuple[str, str], ...] = (
    ("Bangs", "bangs"),
    ("Receding_Hairline", "a receding hairline"),
)
_FACIAL_HAIR: tuple[tuple[str, str], ...] = (
    ("Goatee", "a goatee"),
    ("Mustache", "a mustache"),
    ("5_o_Clock_Shadow", "stubble"),
    ("Sideburns", "sideburns"),
)
_EYEBROWS: tuple[tuple[str, str], ...] = (("Arched_Eyebrows", "arched"), ("Bushy_Eyebrows", "bushy"))
_NOSE: tuple[tuple[str, str], ...] = (("Big_Nose", "big"), ("Pointy_Nose", "pointy"))
_FACE_FEATURES_AFTER_NOSE: tuple[tuple[str, str], ...] = (
    ("Narrow_Eyes", "narrow eyes"),
    ("High_Cheekbones", "high cheekbones"),
    ("Rosy_Cheeks", "rosy cheeks"),
    ("Oval_Face", "an oval face"),
    ("Double_Chin", "a double chin"),
    ("Mouth_Slightly_Open", "a slightly open mouth"),
    ("Heavy_Makeup", "heavy makeup"),
)
_WORN: tuple[tuple[str, str], ...] = (
    ("Eyeglasses", "glasses"),
    ("Wearing_Hat", "a hat"),
    ("Wearing_Earrings", "earrings"),
    ("Wearing_Lipstick", "lipstick"),
    ("Wearing_Necklace", "a necklace"),
    ("Wearing_Necktie", "a necktie"),
)


def _has(attributes: Mapping[str, AttributeValue], name: str) -> bool:
    """Whether the label `name` is set.

    Accepts booleans and CelebA's raw integer labels alike: a value counts as set when it is
    greater than zero, so 1/True are set and -1/0/False are not (note that a bare `bool(-1)`
    would be True). A missing key or None is not set.
    """
    value = attributes.get(name)
    if value is None:
        return False
    return bool(value > 0)


def _join_and(items: list[str], conjunction: str = "and") -> str:
    """["x"] -> "x"; ["x", "y"] -> "x and y"; ["x", "y", "z"] -> "x, y and z"."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


def _article(word: str) -> str:
    """The indefinite article for `word` ("an older", "a young"). All words this module puts
    after an article are plain English adjectives whose sound follows their first letter."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _hair_phrase(attributes: Mapping[str, AttributeValue]) -> Optional[str]:
    """"wavy blond hair", "black and gray hair", "straight hair"; None when no hair label is set."""
    textures = [word for name, word in _HAIR_TEXTURES if _has(attributes, name)]
    colours = [word for name, word in _HAIR_COLOURS if _has(attributes, name)]
    if not textures and not colours:
        return None
    words = [w for w in (_join_and(textures), _join_and(colours)) if w]
    return " ".join(words) + " hair"


def attribute_caption(attributes: Mapping[str, AttributeValue]) -> str:
    """An English description of a face from its CelebA attribute labels.

    Shape of the result (parts in brackets appear only when their labels say so):

        [a blurry photo of ]a|an [attractive smiling chubby pale-skinned bald] young|older
        man|woman[ with <hair>, bangs, a receding hairline, a beard, a goatee, a mustache,
        stubble, sideburns, <eyebrows>, bags under the eyes, big lips, <nose>, narrow eyes,
        high cheekbones, rosy cheeks, an oval face, a double chin, a slightly open mouth,
        heavy makeup][, wearing glasses, a hat, earrings, lipstick, a necklace, a necktie]

    Lists are joined as "x, y and z"; the article agrees with the word after it.

    Label semantics:
    - Values are booleans or CelebA's raw integers (1 set, -1 not set); see `_has`.
    - A missing key means the label is not set. `Young` missing gives "older", `Male` missing
      gives "woman".
    - `No_Beard` is CelebA's one negated label: a beard is mentioned only when `No_Beard` is
      present and explicitly not set. A dict without the key (as in the example in the module
      docstring) says nothing about a beard, so none is mentioned.
    - Keys that are not CelebA attribute names are ignored, so a caller may pass a record's
      whole attribute dict, extra fields included. Spelling matters: a misspelled name
      ("smiling") is ignored like any other unknown key.
    - Contradictory labels, which the real annotations contain, are described as given
      ("a bald man with black hair").
    """
    adjectives = [word for name, word in _LEADING_ADJECTIVES if _has(attributes, name)]
    adjectives.append("young" if _has(attributes, "Young") else "older")
    noun = "man" if _has(attributes, "Male") else "woman"
    subject = f"{_article(adjectives[0])} {' '.join(adjectives)} {noun}"
    if _has(attributes, "Blurry"):
        subject = "a blurry photo of " + subject

    features: list[str] = []
    hair = _hair_phrase(attributes)
    if hair:
        features.append(hair)
    features += [phrase for name, phrase in _HEAD_FEATURES if _has(attributes, name)]
    if attributes.get("No_Beard") is not None and not _has(attributes, "No_Beard"):
        features.append("a beard")
    features += [phrase for name, phrase in _FACIAL_HAIR if _has(attributes, name)]
    eyebrows = [word for name, word in _EYEBROWS if _has(attributes, name)]
    if eyebrows:
        features.append(" and ".join(eyebrows) + " eyebrows")
    if _has(attributes, "Bags_Under_Eyes"):
        features.append("bags under the eyes")
    if _has(attributes, "Big_Lips"):
        features.append("big lips")
    nose = [word for name, word in _NOSE if _has(attributes, name)]
    if nose:
        features.append("a " + " ".join(nose) + " nose")
    features += [phrase for name, phrase in _FACE_FEATURES_AFTER_NOSE if _has(attributes, name)]

    worn = [phrase for name, phrase in _WORN if _has(attributes, name)]

    caption = subject
    if features:
        caption += " with " + _join_and(features)
    if worn:
        caption += ", wearing " + _join_and(worn)
    return caption


def join_captions(vlm: Optional[str], attr: Optional[str], sep: str = ". ") -> str:
    """The training caption: the VLM caption followed by the attribute caption.

    Both parts are stripped of surrounding whitespace; the first part also loses its trailing
    periods, so "A man.  " + "a smiling young man" gives "A man. a smiling young man" with the
    default `sep`. Neither part's text is otherwise changed (no re-capitalisation), so the
    result is predictable. When one part is None or empty (after stripping) the other is
    returned, stripped; when both are, the result is "".
    """
    head = (vlm or "").strip()
    tail = (attr or "").strip()
    head_core = head.rstrip(".").rstrip()
    if not head_core:
        return tail
    if not tail:
        return head
    return f"{head_core}{sep}{tail}"


def add_attribute_caption(sample: Sample, sep: str = ". ") -> Sample:
    """Attribute-caption step: labels -> text, joined after the VLM caption (both kept).

    Without a VLM caption (general-domain images that were not captioned) the text that came
    with the image is the base caption.
    """
    from prep.transforms.caption_labels import contradictions

    attr = attribute_caption(sample.attributes) if sample.attributes else None
    base = sample.caption_vlm if sample.caption_vlm is not None else (sample.text or "")
    return sample.with_(caption_attributes=attr, caption=join_captions(base, attr, sep),
                        caption_contradictions=contradictions(sample.caption_vlm, sample.attributes))
