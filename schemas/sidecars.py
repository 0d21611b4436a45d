"""The parquet sidecar's schema (contract v1): `NNNNNN.parquet` beside each shard, one row per
sample, as img2dataset writes. Written by transforms/write.py, read by the report and the
validator; a new column is one field here and its value in `write.ShardRow`.
"""

from __future__ import annotations

import pyarrow as pa

# One row per sample of a shard. Every sample in a shard was written, so status is always
# "success" and error_message null (img2dataset's columns; rejected inputs are dead letters).
PARQUET_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("identity", pa.string()),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("caption_vlm", pa.string()),
        pa.field("caption_attributes", pa.string()),
        pa.field("caption_words", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("jpg_bytes", pa.int64(), nullable=False),
        pa.field("ref_keys", pa.list_(pa.string()), nullable=False),
        pa.field("ref_count", pa.int32(), nullable=False),
        pa.field("mask_fraction", pa.float64()),  # null for general samples (no mask)
        pa.field("emb_norm", pa.float64(), nullable=False),
        # The identity step (contract.JSON_IDENTITY_FIELDS): null / empty where not verified.
        pa.field("identity_status", pa.string()),
        pa.field("identity_distance", pa.float64()),
        pa.field("identity_centre", pa.string()),
        pa.field("near_duplicates", pa.list_(pa.string()), nullable=False),
        pa.field("faces", pa.int32()),
        pa.field("face_fraction", pa.float64()),
        pa.field("url", pa.string()),  # source_meta's url (img2dataset's KEY.json), else null
    ]
)
