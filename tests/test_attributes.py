"""Tests for prep.transforms.attributes: the attribute caption and the caption join."""

from __future__ import annotations

import gzip

import pytest

from prep.transforms.attributes import CELEBA_ATTRIBUTES, attribute_caption, join_captions

from conftest import CELEBA_SHARED  # noqa: E402

REAL_ATTR_FILE = CELEBA_SHARED / "list_attr_celeba.txt.gz"
needs_real_file = pytest.mark.skipif(not REAL_ATTR_FILE.is_file(), reason=f"{REAL_ATTR_FILE} absent")


def _all(value: bool) -> dict[str, bool]:
    return {name: value for name in CELEBA_ATTRIBUTES}


# Full 40-key bases, so that flipping a label is unambiguous (No_Beard included).
MIXED_WOMAN = {
    **_all(False),
    "Attractive": True,
    "Smiling": True,
    "Young": True,
    "Wavy_Hair": True,
    "Brown_Hair": True,
    "No_Beard": True,
    "High_Cheekbones": True,
    "Wearing_Lipstick": True,
    "Wearing_Earrings": True,
}
MIXED_MAN = {
    **_all(False),
    "Male": True,
    "Black_Hair": True,
    "Straight_Hair": True,
    "Big_Nose": True,
    "Bushy_Eyebrows": True,
    "Eyeglasses": True,
    "Mustache": True,
    "Blurry": True,
}
BASES = {
    "all_false": _all(False),
    "all_true": _all(True),
    "mixed_woman": MIXED_WOMAN,
    "mixed_man": MIXED_MAN,
}


def test_attribute_names_match_the_celeba_file_order():
    assert len(CELEBA_ATTRIBUTES) == 40
    assert len(set(CELEBA_ATTRIBUTES)) == 40
    assert CELEBA_ATTRIBUTES[0] == "5_o_Clock_Shadow"
    assert CELEBA_ATTRIBUTES[20] == "Male"
    assert CELEBA_ATTRIBUTES[-1] == "Young"


@needs_real_file
def test_attribute_names_match_the_real_celeba_file():
    with gzip.open(REAL_ATTR_FILE, "rt") as f:
        f.readline()
        assert tuple(f.readline().split()) == CELEBA_ATTRIBUTES


def test_example_from_the_spec():
    labels = {
        "Smiling": True,
        "Young": True,
        "Wavy_Hair": True,
        "Blond_Hair": True,
        "Wearing_Earrings": True,
        "Male": False,
    }
    assert attribute_caption(labels) == "a smiling young woman with wavy blond hair, wearing earrings"


@pytest.mark.parametrize("base_name", sorted(BASES))
@pytest.mark.parametrize("name", CELEBA_ATTRIBUTES)
def test_every_label_changes_the_caption_when_flipped(base_name, name):
    base = BASES[base_name]
    flipped = {**base, name: not base[name]}
    assert attribute_caption(flipped) != attribute_caption(base)


def test_all_false_and_all_true():
    assert attribute_caption(_all(False)) == "an older woman with a beard"
    assert attribute_caption(_all(True)) == (
        "a blurry photo of an attractive smiling chubby pale-skinned bald young man with wavy and"
        " straight black, blond, brown and gray hair, bangs, a receding hairline, a goatee,"
        " a mustache, stubble, sideburns, arched and bushy eyebrows, bags under the eyes,"
        " big lips, a big pointy nose, narrow eyes, high cheekbones, rosy cheeks, an oval face,"
        " a double chin, a slightly open mouth and heavy makeup, wearing glasses, a hat,"
        " earrings, lipstick, a necklace and a necktie"
    )


def test_mixed_bases():
    assert attribute_caption(MIXED_WOMAN) == (
        "an attractive smiling young woman with wavy brown hair and high cheekbones,"
        " wearing earrings and lipstick"
    )
    assert attribute_caption(MIXED_MAN) == (
        "a blurry photo of an older man with straight black hair, a beard, a mustache,"
        " bushy eyebrows and a big nose, wearing glasses"
    )


@pytest.mark.parametrize(
    "labels, expected",
    [
        ({"Male": True}, "an older man"),
        ({"Male": True, "Young": True}, "a young man"),
        ({"Attractive": True, "Young": True}, "an attractive young woman"),
        ({"Attractive": True, "Male": True}, "an attractive older man"),
        ({"Chubby": True}, "a chubby older woman"),
        ({"Blurry": True, "Young": True}, "a blurry photo of a young woman"),
        ({"Blurry": True, "Male": True}, "a blurry photo of an older man"),
        ({"Bald": True, "Male": True, "Young": True}, "a bald young man"),
        ({"Pale_Skin": True}, "a pale-skinned older woman"),
    ],
)
def test_article_and_subject(labels, expected):
    assert attribute_caption(labels) == expected


def test_feature_list_joining():
    assert attribute_caption({"Young": True, "Bangs": True}) == "a young woman with bangs"
    assert attribute_caption({"Young": True, "Bangs": True, "Big_Lips": True}) == (
        "a young woman with bangs and big lips"
    )
    assert attribute_caption({"Young": True, "Gray_Hair": True, "Bangs": True, "Big_Lips": True}) == (
        "a young woman with gray hair, bangs and big lips"
    )
    assert attribute_caption({"Young": True, "Wearing_Hat": True}) == "a young woman, wearing a hat"
    assert attribute_caption(
        {"Young": True, "Wearing_Hat": True, "Wearing_Necklace": True, "Eyeglasses": True}
    ) == "a young woman, wearing glasses, a hat and a necklace"


def test_missing_keys_and_no_beard():
    # Missing keys are "not set"; a missing No_Beard mentions no beard.
    assert attribute_caption({}) == "an older woman"
    assert attribute_caption({"Male": True, "No_Beard": True}) == "an older man"
    assert attribute_caption({"Male": True, "No_Beard": False}) == "an older man with a beard"
    assert attribute_caption({"Male": True, "No_Beard": None}) == "an older man"


def test_raw_integer_labels_are_understood():
    raw = {name: -1 for name in CELEBA_ATTRIBUTES}
    raw.update({"Male": 1, "Young": 1, "No_Beard": 1, "Smiling": 1})
    as_bool = {name: value > 0 for name, value in raw.items()}
    assert attribute_caption(raw) == attribute_caption(as_bool) == "a smiling young man"


def test_unknown_names_are_ignored():
    base = {"Young": True, "Smiling": True}
    assert attribute_caption({**base, "Sunglasses": True, "smiling": False, "key": 3}) == (
        attribute_caption(base)
    )


def test_caption_is_deterministic_and_order_independent():
    items = list(MIXED_WOMAN.items())
    assert attribute_caption(dict(items)) == attribute_caption(dict(reversed(items)))


@pytest.mark.parametrize(
    "vlm, attr, expected",
    [
        ("A photo of a woman.", "a smiling young woman", "A photo of a woman. a smiling young woman"),
        ("  A photo of a woman...  ", "  a young woman ", "A photo of a woman. a young woman"),
        ("A photo of a woman", "a young woman", "A photo of a woman. a young woman"),
        ("A photo of a woman .", "a young woman", "A photo of a woman. a young woman"),
        (None, "a young woman", "a young woman"),
        ("", " a young woman ", "a young woman"),
        ("A photo.", None, "A photo."),
        ("  A photo. ", "   ", "A photo."),
        ("...", "a young woman", "a young woman"),
        (None, None, ""),
        ("", "", ""),
        (" ", None, ""),
    ],
)
def test_join_captions(vlm, attr, expected):
    assert join_captions(vlm, attr) == expected


def test_join_captions_custom_separator():
    assert join_captions("A photo.", "a young man", sep=", ") == "A photo, a young man"
    assert join_captions("A photo", "a young man", sep=" | ") == "A photo | a young man"
