"""One sample's members (image, caption, JSON fields, embedding, refs, mask) and, once every
shard is read, the cross-sample ref checks."""

from __future__ import annotations

import json
from typing import Optional

import numpy as np

from prep.schemas.contract import (
    ATTRIBUTE_SOURCES,
    CAPTION_FLAGS,
    EXT_EMB,
    EXT_FACE,
    EXT_IMAGE,
    EXT_JSON,
    EXT_MASK,
    EXT_REFS,
    EXT_TEXT,
    JSON_ADDED_FIELDS,
    JSON_FIELDS,
    OPTIONAL,
    REF_KINDS,
    REQUIRED,
    SCHEMA_VERSION,
    load_npy,
)
from prep.schemas.identity_checks import identity_problems, ref_problems
from prep.schemas.records import (
    GENERAL,
    SPECIFIC,
    is_valid_key,
)
from prep.schemas.validate.base import (
    _DIGEST_SIZE,
    _Bad,
    _decode_image,
    _emb_digest,
    _examples,
    _is_int,
    _KeyInfo,
    _PendingRefs,
)


class _SampleChecks:
    """Mixed into the validator (validate/__init__.py)."""

    # ------------------------------------------------------------------ samples

    def check_sample(self, domain: str, loc: str, key: str, members: dict[str, bytes]) -> None:
        """Check one complete sample; remember what the cross-sample checks need."""

        def bad(ext: Optional[str], message: str) -> None:
            self.problem(f"{loc}: {key}.{ext}: {message}" if ext else f"{loc}: {key}: {message}")

        if not is_valid_key(key):
            bad(None, f"invalid key {key!r} (only [A-Za-z0-9_-], no dots)")
        # A repeat inside one shard was already reported as non-consecutive members.
        repeat = key in self.where
        first = self.where.setdefault(key, loc)
        if first != loc:
            bad(None, f"duplicate key, also in {first}")

        required = REQUIRED[domain]
        missing = sorted(required - members.keys())
        extra = sorted(members.keys() - required - OPTIONAL[domain])
        if missing:
            bad(None, f"missing member(s) {', '.join(f'{key}.{e}' for e in missing)}")
        if extra:
            bad(None, f"unexpected member(s) for {domain}: {', '.join(f'{key}.{e}' for e in extra)}")

        size = self.check_image(members.get(EXT_IMAGE), bad)
        text = self.check_text(members.get(EXT_TEXT), bad)
        meta = self.check_json(domain, key, members.get(EXT_JSON), text, size, bad)
        emb = self.check_emb(domain, members.get(EXT_EMB), bad)
        ref_keys = meta.get("ref_keys") if meta is not None else None
        if not (isinstance(ref_keys, list) and all(isinstance(r, str) for r in ref_keys)):
            ref_keys = None
        rows = self.check_refs_array(members.get(EXT_REFS), ref_keys, emb, bad)
        if domain == SPECIFIC and EXT_MASK in members:
            self.check_mask(members[EXT_MASK], size, bad)
        if EXT_FACE in members:
            face = self.load_array(EXT_FACE, members[EXT_FACE], bad)
            if face is not None and (face.dtype != np.float32 or face.ndim != 1 or not np.all(np.isfinite(face))):
                bad(EXT_FACE, f"is {face.dtype} {face.shape}, expected finite float32 [F]")
            if meta is not None and meta.get("face_box") is None:
                bad(EXT_FACE, "present, but the sample has no chosen face (face_box is null)")

        # The identity is only compared with the refs' when it is itself valid.
        identity = meta.get("identity") if meta is not None else None
        identity_known = meta is not None and (
            isinstance(identity, str) if domain == SPECIFIC else "identity" in meta and identity is None
        )
        identity = identity if isinstance(identity, str) else None
        if domain == SPECIFIC and not repeat:
            digest = _emb_digest(emb) if emb is not None and emb.dtype == np.float32 else None
            status = meta.get("identity_status") if meta is not None else None
            self.specific[key] = _KeyInfo(identity=identity, emb_digest=digest, identity_status=status)
        kinds = meta.get("ref_kinds") if meta is not None else None
        if ref_keys and isinstance(kinds, list) and len(kinds) == len(ref_keys):
            # Augmented refs are views of this sample (checked with its JSON), not other samples:
            # only the identity refs are resolved; the rows' digests follow the same selection.
            keep = [i for i, kind in enumerate(kinds) if kind != "augmented"]
            if rows is not None and len(keep) != len(ref_keys):
                rows = b"".join(rows[i * _DIGEST_SIZE:(i + 1) * _DIGEST_SIZE] for i in keep)
            ref_keys = [ref_keys[i] for i in keep]
        if ref_keys:
            self.pending_refs.append(
                _PendingRefs(
                    where=f"{loc}: {key}.{EXT_REFS}",
                    key=key,
                    identity=identity,
                    identity_known=identity_known,
                    ref_keys=ref_keys,
                    row_digests=rows,
                    identity_status=meta.get("identity_status") if meta is not None else None,
                )
            )

    def check_image(self, data: Optional[bytes], bad: _Bad) -> Optional[tuple[int, int]]:
        """The JPEG must decode fully to RGB; return its (width, height)."""
        if data is None:
            return None
        try:
            img = _decode_image(data)
        except Exception as e:  # PIL raises many types on malformed input; all mean "bad image"
            bad(EXT_IMAGE, f"does not decode ({type(e).__name__}: {e})")
            return None
        if img.format != "JPEG":
            bad(EXT_IMAGE, f"is {img.format}, not JPEG")
        if img.mode != "RGB":
            bad(EXT_IMAGE, f"decodes to mode {img.mode}, not RGB")
        return img.size

    def check_text(self, data: Optional[bytes], bad: _Bad) -> Optional[str]:
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            bad(EXT_TEXT, f"not UTF-8 ({e})")
            return None

    def check_json(
        self,
        domain: str,
        key: str,
        data: Optional[bytes],
        text: Optional[str],
        size: Optional[tuple[int, int]],
        bad: _Bad,
    ) -> Optional[dict]:
        """Check KEY.json field by field; return it if it is an object."""
        if data is None:
            return None
        try:
            meta = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            bad(EXT_JSON, f"not valid JSON ({e})")
            return None
        if not isinstance(meta, dict):
            bad(EXT_JSON, f"top level is {type(meta).__name__}, not an object")
            return None

        missing = [f for f in JSON_FIELDS if f not in meta]
        extra = sorted(set(meta) - set(JSON_FIELDS) - set(JSON_ADDED_FIELDS))
        if missing:
            bad(EXT_JSON, f"missing field(s) {', '.join(missing)}")
        if extra:
            bad(EXT_JSON, f"unexpected field(s) {', '.join(extra)}")

        def field_problem(name: str, expected: str) -> None:
            bad(EXT_JSON, f"{name} is {meta[name]!r}, expected {expected}")

        if "key" in meta and meta["key"] != key:
            field_problem("key", repr(key))
        if "caption_flags" in meta and not (
            isinstance(meta["caption_flags"], list) and meta["caption_flags"]
            and all(f in CAPTION_FLAGS for f in meta["caption_flags"])
        ):
            field_problem("caption_flags", f"a non-empty list of {', '.join(CAPTION_FLAGS)}")
        if "caption_contradictions" in meta and not (
            isinstance(meta["caption_contradictions"], list) and meta["caption_contradictions"]
            and all(isinstance(c, dict) and set(c) == {"attribute", "label", "words"}
                    and isinstance(c["label"], bool) and isinstance(c["words"], str)
                    for c in meta["caption_contradictions"])
        ):
            field_problem("caption_contradictions", "a non-empty list of {attribute, label, words}")
        if "attributes_source" in meta and meta["attributes_source"] not in (*ATTRIBUTE_SOURCES, None):
            field_problem("attributes_source", f"one of {', '.join(ATTRIBUTE_SOURCES)} or null")
        elif meta.get("attributes_source") and not meta.get("attributes"):
            field_problem("attributes_source", "null for a sample without attributes")
        if "attribute_probabilities" in meta and not (
            isinstance(meta["attribute_probabilities"], dict)
            and all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1
                    for p in meta["attribute_probabilities"].values())
        ):
            field_problem("attribute_probabilities", "an object of attribute -> probability in [0, 1]")
        if "attribute_doubts" in meta and not (
            isinstance(meta["attribute_doubts"], list) and meta["attribute_doubts"]
            and all(isinstance(d, dict) and set(d) == {"attribute", "label", "probability"}
                    and isinstance(d["label"], bool)
                    and (meta.get("attributes") or {}).get(d["attribute"]) == d["label"]
                    for d in meta["attribute_doubts"])
        ):
            field_problem("attribute_doubts", "a non-empty list of {attribute, label, probability}, each label the sample's")
        if "source_meta" in meta and not isinstance(meta["source_meta"], dict):
            field_problem("source_meta", "an object (the source's own metadata)")
        if "schema_version" in meta and not (
            _is_int(meta["schema_version"]) and meta["schema_version"] == SCHEMA_VERSION
        ):
            field_problem("schema_version", str(SCHEMA_VERSION))
        if "domain" in meta and meta["domain"] != domain:
            field_problem("domain", f"{domain!r} (the shard's folder)")
        if "source" in meta and not (isinstance(meta["source"], str) and meta["source"]):
            field_problem("source", "a non-empty string")
        if "identity" in meta:
            identity = meta["identity"]
            if domain == SPECIFIC and not (isinstance(identity, str) and identity):
                field_problem("identity", "a non-empty string for a specific sample")
            elif domain == GENERAL and identity is not None:
                field_problem("identity", "null for a general sample")
        if "attributes" in meta:
            attrs = meta["attributes"]
            if attrs is not None and not (
                isinstance(attrs, dict) and all(isinstance(v, bool) for v in attrs.values())
            ):
                field_problem("attributes", "null or an object of name -> bool")
        for name in ("caption_vlm", "caption_attributes"):
            if name in meta and meta[name] is not None and not isinstance(meta[name], str):
                field_problem(name, "a string or null")
        if "caption" in meta:
            if not isinstance(meta["caption"], str):
                field_problem("caption", "a string")
            elif text is not None and meta["caption"] != text:
                bad(EXT_JSON, f"caption {meta['caption']!r} differs from {key}.{EXT_TEXT} {text!r}")
        for name, index in (("width", 0), ("height", 1)):
            if name not in meta:
                continue
            if not (_is_int(meta[name]) and meta[name] > 0):
                field_problem(name, "a positive int")
            elif size is not None and meta[name] != size[index]:
                field_problem(name, f"{size[index]} (the decoded {key}.{EXT_IMAGE})")
        if "ref_keys" in meta and not (
            isinstance(meta["ref_keys"], list) and all(isinstance(r, str) for r in meta["ref_keys"])
        ):
            field_problem("ref_keys", "a list of strings")
        elif "ref_kinds" in meta and not (
            isinstance(meta["ref_kinds"], list) and len(meta["ref_kinds"]) == len(meta.get("ref_keys") or [])
            and all(k in REF_KINDS for k in meta["ref_kinds"])
        ):
            field_problem("ref_kinds", f"one of {', '.join(REF_KINDS)} per ref_keys entry")
        elif "ref_kinds" in meta and any(
            (kind == "augmented") != ref.startswith(f"{key}#aug") for ref, kind in zip(meta["ref_keys"], meta["ref_kinds"])
        ):
            field_problem("ref_keys", f"augmented refs named {key}#aug<j> and only those (ref_kinds {meta['ref_kinds']})")
        elif domain == SPECIFIC and meta.get("identity_model") is not None:
            threshold = self.identity_thresholds.get(meta["identity_model"])
            for message in identity_problems(meta, threshold):
                bad(EXT_JSON, message)
        return meta

    def load_array(self, ext: str, data: bytes, bad: _Bad) -> Optional[np.ndarray]:
        try:
            return load_npy(data)
        except Exception as e:  # numpy raises several types on a malformed .npy; all mean "bad"
            bad(ext, f"does not load as .npy without pickle ({type(e).__name__}: {e})")
            return None

    def check_emb(self, domain: str, data: Optional[bytes], bad: _Bad) -> Optional[np.ndarray]:
        """float32 [D], D equal across samples; unit norm (specific) or all zeros (general).

        Returns the array if it is 1-D (so its D can check the refs), else None.
        """
        if data is None:
            return None
        emb = self.load_array(EXT_EMB, data, bad)
        if emb is None:
            return None
        if emb.dtype != np.float32:
            bad(EXT_EMB, f"dtype is {emb.dtype}, not float32")
        if emb.ndim != 1 or emb.shape[0] == 0:
            bad(EXT_EMB, f"shape is {emb.shape}, expected [D] with D > 0")
            return None
        if self.dim is None:
            self.dim = emb.shape[0]
        elif emb.shape[0] != self.dim:
            bad(EXT_EMB, f"dimension {emb.shape[0]}, the first embedding read has {self.dim}")
        values = emb.astype(np.float64)
        if not np.all(np.isfinite(values)):
            bad(EXT_EMB, "has non-finite values")
        elif domain == SPECIFIC:
            norm = float(np.linalg.norm(values))
            if abs(norm - 1.0) > self.tolerance:
                bad(EXT_EMB, f"norm is {norm:.6g}, not 1 (tolerance {self.tolerance:g})")
        elif np.any(values != 0):
            bad(EXT_EMB, "a general sample's embedding must be all zeros")
        return emb

    def check_refs_array(
        self,
        data: Optional[bytes],
        ref_keys: Optional[list[str]],
        emb: Optional[np.ndarray],
        bad: _Bad,
    ) -> Optional[bytes]:
        """float32 [len(ref_keys), D]; return the rows' digests, concatenated (None if unusable)."""
        if data is None:
            return None
        refs = self.load_array(EXT_REFS, data, bad)
        if refs is None:
            return None
        usable = True
        if refs.dtype != np.float32:
            bad(EXT_REFS, f"dtype is {refs.dtype}, not float32")
            usable = False
        if refs.ndim != 2:
            bad(EXT_REFS, f"shape is {refs.shape}, expected [K, D]")
            return None
        if ref_keys is not None and refs.shape[0] != len(ref_keys):
            bad(EXT_REFS, f"has {refs.shape[0]} rows but ref_keys has {len(ref_keys)} entries")
            usable = False
        if emb is not None and refs.shape[1] != emb.shape[0]:
            bad(EXT_REFS, f"rows have dimension {refs.shape[1]}, the embedding has {emb.shape[0]}")
            usable = False
        return b"".join(_emb_digest(row) for row in refs) if usable else None

    def check_mask(self, data: bytes, size: Optional[tuple[int, int]], bad: _Bad) -> None:
        """PNG, mode L, only 0 and 255, the image's size."""
        try:
            mask = _decode_image(data)
        except Exception as e:  # as in check_image
            bad(EXT_MASK, f"does not decode ({type(e).__name__}: {e})")
            return
        if mask.format != "PNG":
            bad(EXT_MASK, f"is {mask.format}, not PNG")
        if mask.mode != "L":
            bad(EXT_MASK, f"mode is {mask.mode}, not L (8-bit single channel)")
        else:
            values = np.unique(np.asarray(mask))
            others = values[(values != 0) & (values != 255)]
            if others.size:
                shown = _examples([str(v) for v in others])
                bad(EXT_MASK, f"has values other than 0 and 255 (e.g. {shown})")
        if size is not None and mask.size != size:
            (mw, mh), (w, h) = mask.size, size
            bad(EXT_MASK, f"size {mw}x{mh} differs from the image's {w}x{h}")


    # ------------------------------------------------------------------ cross-sample checks

    def check_refs(self) -> None:
        """Resolve every ref: a specific sample, not itself, same identity, row == its emb.

        A ref that is not found while some shard was unreadable may well be in the unread
        part; such refs are summed up in one line instead of one misleading line each.
        """
        unresolved = 0
        for pending in self.pending_refs:
            for i, ref in enumerate(pending.ref_keys):
                where = f"{pending.where}: ref_keys[{i}] {ref!r}"
                if ref == pending.key:
                    self.problem(f"{where} is the sample itself")
                    continue
                info = self.specific.get(ref)
                if info is None:
                    if ref in self.where:
                        self.problem(f"{where} is not a specific sample (it is in {self.where[ref]})")
                    elif self.unreadable:
                        unresolved += 1
                    else:
                        self.problem(f"{where} is not a sample in any shard")
                    continue
                if pending.identity_status is not None:
                    for message in ref_problems({"key": pending.key, "identity_status": pending.identity_status},
                                                {"key": ref, "identity_status": info.identity_status}):
                        self.problem(f"{where}: {message}")
                known = pending.identity_known and info.identity is not None
                if known and info.identity != pending.identity:
                    self.problem(
                        f"{where} has identity {info.identity!r}, this sample has {pending.identity!r}"
                    )
                rows = pending.row_digests
                row = rows[i * _DIGEST_SIZE : (i + 1) * _DIGEST_SIZE] if rows is not None else None
                if row is not None and info.emb_digest is not None and row != info.emb_digest:
                    self.problem(f"{pending.where}: row {i} differs from the embedding of {ref!r}")
        if unresolved:
            self.problem(
                f"{unresolved} ref(s) name keys not found in the readable shards "
                f"(unreadable: {_examples(self.unreadable)})"
            )
