"""`write_atomic`: the one way prep writes a file (shards, sidecars, manifests, demo data,
checkpoints, pages): to a temporary sibling, then a rename, through Beam's FileSystems (local
paths and gs:// alike), so a killed process never leaves half a file under a final name."""

from __future__ import annotations

import json
import os
import uuid


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling and a rename (parent folders are made)."""
    from apache_beam.io.filesystems import FileSystems

    from prep.faults import fault_point

    path = os.fspath(path)
    directory, name = path.rsplit("/", 1) if "/" in path else (".", path)
    tmp = f"{directory}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    fault_point("write.before_rename")
    FileSystems.rename([tmp], [path])  # os.rename locally (atomic replace); copy+delete on GCS


def write_json(path: str | os.PathLike, data) -> None:
    """`data` as prep writes its JSON files (manifest, run state, plans, probe meta): indent 1,
    keys sorted, a final newline; atomically. One form, so a rewrite of the manifest (--reuse,
    prep weights) is byte for byte what the run would write."""
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))
