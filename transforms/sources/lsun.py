"""LSUN as it ships: one category folder (`dog/`, unpacked from `dog.zip`) holding an LMDB
database, `data.mdb`, whose records are key -> encoded image (WebP for the object categories,
JPEG for the scenes; PNG is accepted too).

Planning (`plan_lsun`, on the launcher) walks the database's keys in key order without reading
a value, so listing five million records reads only the B-tree's key pages; each record becomes
one `SourceItem` (source "lsun", path `<folder>#<record key>`), and items are what every runner
splits: `--workers`, chunked runs and Dataflow's workers each read the records they were given.
Reading (`read_record`, called by `ReadImageBytes` on the workers) looks the key up in the
database, opened read-only and without a lock file (the folder may be read-only), once per
process and folder.

LSUN has no identities and no labels: every photo is its own object, so a record's identity is
its own key (an identity group of one: no second photo to pair with; see `--singleton-refs`).
Lineage: `origin` = {"input": n, "key": record key}; the manifest's `config.inputs[n]` names the
database.

lmdb opens local files only (it memory-maps them): a `gs://` folder is refused at planning;
copy the folder to local disk or mount it on every worker.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from prep.schemas.records import (
    SPECIFIC,
    DeadLetter,
    SourceItem,
    SourceReport,
    make_key,
)

LSUN_DB = "data.mdb"
HEX_PREFIX = "hex:"  # a record key that is not printable ASCII, written as its bytes in hex

_ENVS: dict[str, object] = {}
_ENVS_LOCK = threading.Lock()


def key_text(raw: bytes) -> str:
    """A record key as text: itself when it is printable ASCII without '#' (LSUN's keys are
    40 hex digits), else `hex:` and its bytes in hex, so that `key_bytes` gives it back."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return HEX_PREFIX + raw.hex()
    if text.isprintable() and "#" not in text and not text.startswith(HEX_PREFIX) and text:
        return text
    return HEX_PREFIX + raw.hex()


def key_bytes(text: str) -> bytes:
    return bytes.fromhex(text[len(HEX_PREFIX):]) if text.startswith(HEX_PREFIX) else text.encode("ascii")


def check_lsun_location(location: str) -> str:
    """The normalised folder of an lsun: input; FileNotFoundError when it or its data.mdb is
    missing, ValueError for a location lmdb cannot open (not a local folder)."""
    from prep.transforms.sources.files import normalize_root

    root = normalize_root(location)
    if "://" in root:
        raise ValueError(f"lsun source {root}: lmdb reads local files only; copy the folder to local disk "
                         "(or mount it on every worker) and give its local path")
    if not os.path.exists(root):
        raise FileNotFoundError(f"lsun source {root} does not exist")
    if not os.path.isdir(root):
        raise ValueError(f"lsun source {root} is a file, not a folder (give the folder that holds {LSUN_DB})")
    if not os.path.isfile(os.path.join(root, LSUN_DB)):
        found = sorted(os.listdir(root))[:5]
        raise FileNotFoundError(
            f"lsun source {root} holds no {LSUN_DB} (an LSUN category folder, e.g. dog/ from dog.zip, holds "
            f"data.mdb and lock.mdb){'; found ' + ', '.join(found) if found else '; the folder is empty'}")
    return root


def open_env(root: str):
    """The folder's database, read-only and lock-free, opened once per process (lmdb refuses a
    second handle on one file in a process); reopened when data.mdb was replaced since."""
    stat = os.stat(os.path.join(root, LSUN_DB))
    version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    with _ENVS_LOCK:
        held = _ENVS.get(root)
        if held is not None and held[0] == version:
            return held[1]
        if held is not None:
            held[1].close()
        import lmdb

        env = lmdb.open(root, readonly=True, lock=False, readahead=False, meminit=False, subdir=True,
                        max_readers=512)
        _ENVS[root] = (version, env)
        return env


def plan_lsun(location: str, namespace: str = "lsun") -> tuple[list[SourceItem], list[DeadLetter], SourceReport]:
    """One SourceItem per record, in key order; keys are `<namespace>_<record key>` (alone,
    `lsun_<40 hex digits>`). An empty database raises FileNotFoundError (an input that yields
    nothing is never silent)."""
    root = check_lsun_location(location)
    report = SourceReport(spec=f"lsun:{root}", kind="lsun")
    env = open_env(root)
    items: list[SourceItem] = []
    hex_keys = 0
    with env.begin(buffers=False) as txn:
        for raw in txn.cursor().iternext(keys=True, values=False):
            text = key_text(bytes(raw))
            hex_keys += text.startswith(HEX_PREFIX)
            items.append(SourceItem(key=make_key(namespace, text), source="lsun", domain=SPECIFIC,
                                    path=f"{root}#{text}", identity=text, origin={"key": text}))
    if not items:
        raise FileNotFoundError(f"lsun source {root}: {LSUN_DB} holds no record")
    if hex_keys:
        report.warnings.append(f"{hex_keys} record key(s) are not printable ASCII; written as {HEX_PREFIX}<hex>")
    report.items = len(items)
    report.stats = {"records": len(items), "database_bytes": os.path.getsize(os.path.join(root, LSUN_DB)),
                    "first_key": items[0].origin["key"], "last_key": items[-1].origin["key"]}
    return items, [], report


def record_of(item) -> tuple[str, str]:
    """(folder, record key text) of an lsun item or sample."""
    key = (item.origin or {}).get("key")
    if key is None or not item.path.endswith("#" + key):
        raise ValueError(f"{item.key}: not an lsun record (path {item.path!r}, origin {item.origin!r})")
    return item.path[: -len(key) - 1], key


def read_record(item, max_bytes: int) -> Optional[bytes]:
    """The record's value (at most max_bytes + 1 of it), None when the key is gone (the
    database changed since planning)."""
    root, key = record_of(item)
    with open_env(root).begin(buffers=True) as txn:
        value = txn.get(key_bytes(key))
        if value is None:
            return None
        return bytes(value[: max_bytes + 1])
