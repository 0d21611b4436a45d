"""The planned items of a large run, staged as files under OUT/_plan/ instead of inline in the
job graph (`beam.Create` embeds its elements; Dataflow's graph limit is 10 MB)."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

from prep.atomic import write_atomic
from prep.schemas import contract
from prep.schemas.records import SourceItem

INLINE_ITEMS = 10_000  # above this, the planned items go to files, not into the job graph
ITEMS_PER_FILE = 50_000


def item_line(item: SourceItem) -> str:
    return json.dumps(dataclasses.asdict(item), sort_keys=True, ensure_ascii=False)


def parse_item(line: str) -> SourceItem:
    return SourceItem(**json.loads(line))


def stage_items(items: Sequence[SourceItem], out: str, inline_limit: Optional[int] = None) -> Optional[str]:
    """Write the planned items as JSON lines under OUT/_plan/ when there are many, and return
    the files' pattern (None: few enough to stay inline; RunPlan.items_pattern takes it).

    `beam.Create` embeds its elements in the job graph: at CelebA scale that is ~7 MB of
    Dataflow's 10 MB limit. From files, the workers read the items and the graph stays small.
    """
    if len(items) <= (INLINE_ITEMS if inline_limit is None else inline_limit):
        return None
    base = f"{out.rstrip('/')}/{contract.PLAN_DIR}"
    ordered = sorted(items, key=lambda i: i.key)
    for n, start in enumerate(range(0, len(ordered), ITEMS_PER_FILE)):
        lines = "".join(item_line(i) + "\n" for i in ordered[start:start + ITEMS_PER_FILE])
        write_atomic(f"{base}/items-{n:05d}.jsonl", lines.encode("utf-8"))
    return f"{base}/items-*.jsonl"
