"""Training data: the shard contract v1, streamed with webdataset, mixed and regularised.

One training example is a triplet (image x, object embedding o, text t). Per sample:

- **mixing**: with probability `ratio` (the paper's r) the sample is drawn from the
  domain-specific shards, otherwise from the general ones (a seeded Bernoulli draw per sample,
  so the realised ratio equals r in expectation);
- **cross-reference regularisation**: a domain-specific sample's o is, with probability
  `omega` (ω), replaced by one random row of its `KEY.refs.npy` (the embedding of another
  image of the same identity), when it has any (K > 0); `swapped`/`ref_index` record it;
- **object-embedding dropping**: general-domain samples get φ (all zeros), whatever the shard
  holds; `object_drop` optionally does the same to domain-specific samples;
- **text dropping** for classifier-free guidance: with probability `text_drop` the caption
  becomes "".

Splitting across ranks and DataLoader workers: every (rank, worker) pair is one *slot* of
`world_size * num_workers`. Each epoch the shard list is permuted with a seed shared by all
slots; a domain with at least as many shards as slots is split by shard (slot i reads shards
i, i + slots, ...); one with fewer shards is split by sample (every slot reads all of them and
keeps the samples whose ordinal in the epoch's order is i modulo slots). Either way the slots
are disjoint and together see every sample once per epoch, whatever the shard count.

Determinism and exact resume: everything random is a function of (seed, slot, epoch,
position), never of global RNG state, and the stream yields whole batches. Worker w of a
DataLoader produces the batches b with b % num_workers == w (the DataLoader takes them round
robin), so the stream can restart at batch B: each worker fast-forwards its own sub-stream
(reading, not decoding, the samples it skips) and the workers are rotated so that worker 0
produces batch B. `start_batch` is the "data position" a checkpoint stores.

Safety: shards are data, never code. Arrays are decoded with `allow_pickle=False` (a pickled
object array is an error), images with PIL only; webdataset's decoders are not used.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps

from prep.schemas import contract
from prep.schemas.contract import (
    EXT_EMB,
    EXT_IMAGE,
    EXT_JSON,
    EXT_REFS,
    EXT_TEXT,
    REQUIRED,
    load_npy,
)

log = logging.getLogger(__name__)

SPECIFIC, GENERAL = contract.SPECIFIC, contract.GENERAL
_DOMAIN_TAG = {SPECIFIC: 0, GENERAL: 1}
IDENTITY_REF = contract.REF_KINDS[0]  # "identity": another photo; "augmented": a view of the sample itself
# swap_refs: "all" rows of refs.npy may be swapped in (the paper's ω, with augmented views
# standing in where an object has no second photo), or only "identity" rows.
SWAP_REFS = ("all", "identity")
# Stream tags: independent random streams derived from one seed.
_TAG_SHARD_ORDER, _TAG_SHUFFLE, _TAG_MIX, _TAG_AUGMENT, _TAG_WEIGHTS = 1, 2, 3, 4, 5


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A generator that depends only on (seed, *key)."""
    return np.random.default_rng([seed, *key])


def _counted(samples: Iterator[dict], read: list) -> Iterator[dict]:
    for sample in samples:
        read[0] += 1
        yield sample


def read_weights(folder: str) -> dict[str, float]:
    """key -> sampling weight from the `*_weights.parquet` files beside one folder's shards."""
    import pyarrow.parquet as pq

    weights: dict[str, float] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*" + contract.WEIGHTS_SUFFIX))):
        table = pq.read_table(path, columns=["key", "weight"]).to_pydict()
        weights.update(zip(table["key"], table["weight"]))
    return weights


def list_shards(directory: Optional[str]) -> list[str]:
    """The `*.tar` shards of a contract directory (OUT/specific or OUT/general), sorted."""
    if not directory:
        return []
    return sorted(os.path.abspath(p) for p in glob.glob(os.path.join(directory, "*" + contract.SHARD_SUFFIX)))


def image_tensor(data: bytes, size: int) -> torch.Tensor:
    """JPEG bytes -> float tensor [3, size, size] in [-1, 1] (centre crop to square, resize)."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    rgb = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def decode_array(data: bytes, what: str) -> np.ndarray:
    """A `.npy` member -> float32 array; refuses pickles and non-float32 data."""
    array = load_npy(data)  # allow_pickle=False: an object array raises ValueError
    if array.dtype != np.float32:
        raise ValueError(f"{what}: dtype {array.dtype}, the contract says float32")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what}: non-finite values")
    return array


@dataclass(frozen=True)
class Triplet:
    """One decoded, regularised training sample."""

    key: str
    image: torch.Tensor  # [3, S, S] in [-1, 1]
    text: str  # "" when dropped
    object: np.ndarray  # float32 [D]; φ (zeros) for general samples
    specific: bool
    swapped: bool  # o was replaced by a same-identity reference
    ref_index: int  # the refs row used, -1 when not swapped
    swap_kind: str  # that row's kind ("identity" / "augmented"), "" when not swapped
    text_dropped: bool
    object_dropped: bool
    slot: int  # which (rank, worker) sub-stream produced it
    index: int  # its position in that sub-stream


def collate(samples: list[Triplet]) -> dict[str, Any]:
    """A list of triplets -> a batch dict of tensors (strings stay lists)."""
    return {
        "key": [s.key for s in samples],
        "text": [s.text for s in samples],
        "image": torch.stack([s.image for s in samples]),
        "object": torch.from_numpy(np.stack([s.object for s in samples])),
        "specific": torch.tensor([s.specific for s in samples]),
        "swapped": torch.tensor([s.swapped for s in samples]),
        "ref_index": torch.tensor([s.ref_index for s in samples]),
        "swap_augmented": torch.tensor([s.swap_kind == "augmented" for s in samples]),
        "text_dropped": torch.tensor([s.text_dropped for s in samples]),
        "object_dropped": torch.tensor([s.object_dropped for s in samples]),
        "slot": torch.tensor([s.slot for s in samples]),
        "index": torch.tensor([s.index for s in samples]),
    }


class TripletStream(torch.utils.data.IterableDataset):
    """Batches of mixed, regularised triplets from contract-v1 shards.

    Use with `torch.utils.data.DataLoader(stream, batch_size=None, num_workers=N)`.
    `epochs=None` streams forever (each domain restarts with a new permutation when it runs
    out: training counts steps, not epochs); `epochs=n` makes every domain pass n times over
    its samples, then ends (a domain that ends first leaves the rest to the other one), and the
    last batch of each worker may be short. `start_batch` (restart at a batch) assumes the
    infinite stream and at least one sample per (rank, worker) slot; with fewer samples than
    slots a slot is idle, which is correct for an epoch but shifts the DataLoader's round robin.
    """

    def __init__(
        self,
        specific: Optional[str],
        general: Optional[str] = None,
        *,
        ratio: float = 0.3,
        omega: float = 0.5,
        text_drop: float = 0.1,
        object_drop: float = 0.0,
        image_size: int = 64,
        batch_size: int = 16,
        embed_dim: Optional[int] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: Optional[int] = None,
        shuffle_buffer: int = 256,
        start_batch: int = 0,
        swap_refs: str = "all",
        weights: bool = False,
    ):
        super().__init__()
        if swap_refs not in SWAP_REFS:
            raise ValueError(f"swap_refs must be one of {SWAP_REFS}, got {swap_refs!r}")
        self.swap_refs = swap_refs
        for name, p in (("ratio", ratio), ("omega", omega), ("text_drop", text_drop), ("object_drop", object_drop)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or image_size < 1 or shuffle_buffer < 1 or start_batch < 0:
            raise ValueError("batch_size, image_size and shuffle_buffer must be >= 1, start_batch >= 0")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        self.shards = {SPECIFIC: list_shards(specific), GENERAL: list_shards(general)}
        self.weights: Optional[dict[str, float]] = None
        if weights:
            self.weights = read_weights(specific)
            if not self.weights:
                raise ValueError(f"no *{contract.WEIGHTS_SUFFIX} beside the shards in {specific!r}: write them with "
                                 "`prep weights OUT --balance ATTR,...` first")
        # A domain that is never drawn need not exist.
        if ratio > 0 and not self.shards[SPECIFIC]:
            raise ValueError(f"no domain-specific shards (*.tar) in {specific!r}; ratio={ratio} needs them")
        if ratio < 1 and not self.shards[GENERAL]:
            raise ValueError(
                f"no general-domain shards (*.tar) in {general!r}; ratio={ratio} needs them "
                f"(pass ratio=1.0 to train on domain-specific samples only)"
            )
        self.ratio, self.omega, self.text_drop, self.object_drop = ratio, omega, text_drop, object_drop
        self.image_size, self.batch_size, self.embed_dim = image_size, batch_size, embed_dim
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epochs, self.shuffle_buffer, self.start_batch = epochs, shuffle_buffer, start_batch

    # -- raw samples of one domain, for one slot ------------------------------------------

    def _domain_epoch(self, domain: str, epoch: int, slot: int, slots: int, read: Optional[list] = None) -> Iterator[dict]:
        """This slot's share of one pass over a domain, shuffled; raw (undecoded) samples."""
        shards = self.shards[domain]
        tag = _DOMAIN_TAG[domain]
        order = _rng(self.seed, _TAG_SHARD_ORDER, tag, epoch).permutation(len(shards))
        urls = [shards[i] for i in order]
        by_shard = len(urls) >= slots
        mine = urls[slot::slots] if by_shard else urls
        samples = wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([{"url": u} for u in mine]))
        if not by_shard:
            samples = (s for ordinal, s in enumerate(samples) if ordinal % slots == slot)
        if read is not None:
            samples = _counted(samples, read)
        if domain == SPECIFIC and self.weights is not None:
            samples = self._weighted(samples, epoch)
        shuffle_seed = int(_rng(self.seed, _TAG_SHUFFLE, tag, epoch, slot, slots).integers(2**63))
        initial = min(self.shuffle_buffer, 64)
        yield from wds.shuffle(self.shuffle_buffer, initial, rng=random.Random(shuffle_seed))(iter(samples))

    def _weighted(self, samples: Iterator[dict], epoch: int) -> Iterator[dict]:
        """Each sample floor(w) times, and once more with probability frac(w), w its weight
        (`prep weights`): a weighted epoch, drawn from (seed, epoch, key) alone. A sample the
        weights do not list keeps weight 1."""
        for sample in samples:
            w = self.weights.get(sample["__key__"], 1.0)
            key = int.from_bytes(hashlib.sha256(sample["__key__"].encode("utf-8")).digest()[:8], "little")
            u = _rng(self.seed, _TAG_WEIGHTS, epoch, key).random()
            for _ in range(int(w) + (u < w - int(w))):
                yield sample

    def _domain(self, domain: str, slot: int, slots: int) -> Iterator[dict]:
        """Passes over a domain, one after another (forever when epochs is None)."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            read = [0]  # samples read from the shards this epoch, before weighting (which may draw none)
            for sample in self._domain_epoch(domain, epoch, slot, slots, read):
                yield sample
            if read[0] == 0:
                if self.epochs is None:
                    log.warning("slot %d of %d holds no %s samples: it draws only the other domain", slot, slots, domain)
                return
            epoch += 1

    def _mixed(self, slot: int, slots: int) -> Iterator[tuple[bool, dict]]:
        """(is_specific, raw sample): specific with probability `ratio`, per sample."""
        sources = {}
        if self.ratio > 0:
            sources[True] = self._domain(SPECIFIC, slot, slots)
        if self.ratio < 1:
            sources[False] = self._domain(GENERAL, slot, slots)
        draws = _rng(self.seed, _TAG_MIX, slot, slots)
        while sources:
            want = bool(draws.random() < self.ratio)
            if want not in sources:
                want = not want
            try:
                yield want, next(sources[want])
            except StopIteration:
                del sources[want]

    # -- decoding and the paper's regularisation -------------------------------------------

    def _triplet(self, specific: bool, raw: dict, slot: int, slots: int, index: int) -> Triplet:
        key = raw["__key__"]
        where = f"{raw.get('__url__')}: sample {key!r}"
        missing = REQUIRED[SPECIFIC if specific else GENERAL] - set(raw)
        if missing:
            raise ValueError(f"{where}: missing members {sorted(missing)} (shard contract v1)")
        emb = decode_array(raw[EXT_EMB], f"{where} {EXT_EMB}")
        refs = decode_array(raw[EXT_REFS], f"{where} {EXT_REFS}")
        dim = self.embed_dim if self.embed_dim is not None else emb.shape[-1]
        if emb.shape != (dim,) or refs.ndim != 2 or (len(refs) and refs.shape[1] != dim):
            raise ValueError(f"{where}: emb {emb.shape} / refs {refs.shape} do not fit embedding dim {dim}")
        # Fixed number of draws per sample, whatever the branch: reproducible from (slot, index).
        u_swap, u_row, u_object, u_text = _rng(self.seed, _TAG_AUGMENT, slot, slots, index).random(4)
        swapped, ref_index, object_dropped = False, -1, False
        if not specific:
            obj = np.zeros((dim,), np.float32)  # φ
        elif u_object < self.object_drop:
            obj, object_dropped = np.zeros((dim,), np.float32), True
        elif len(refs) > 0 and u_swap < self.omega and (rows := self._swappable(raw, len(refs), where)):
            ref_index = rows[int(u_row * len(rows))]
            obj, swapped = refs[ref_index].copy(), True
        else:
            obj = emb
        text_dropped = bool(u_text < self.text_drop)
        text = "" if text_dropped else raw[EXT_TEXT].decode("utf-8")
        kinds = self._kinds(raw, len(refs), where) if swapped else []
        return Triplet(
            key=key, image=image_tensor(raw[EXT_IMAGE], self.image_size), text=text, object=obj,
            specific=specific, swapped=swapped, ref_index=ref_index, swap_kind=kinds[ref_index] if swapped else "",
            text_dropped=text_dropped,
            object_dropped=object_dropped, slot=slot, index=index,
        )

    @staticmethod
    def _kinds(raw: dict, n: int, where: str) -> list[str]:
        """Each refs row's kind, from KEY.json's ref_kinds (absent: outputs from before
        augmented refs, all identity)."""
        kinds = json.loads(raw[EXT_JSON]).get("ref_kinds") if EXT_JSON in raw else None
        if kinds is None:
            return [IDENTITY_REF] * n
        if not isinstance(kinds, list) or len(kinds) != n:
            raise ValueError(f"{where}: ref_kinds {kinds!r} does not give one kind per refs row ({n})")
        return kinds

    def _swappable(self, raw: dict, n: int, where: str) -> list[int]:
        """The refs rows ω may swap in: all, or (swap_refs="identity") only other photos."""
        if self.swap_refs == "all":
            return list(range(n))
        return [i for i, kind in enumerate(self._kinds(raw, n, where)) if kind == IDENTITY_REF]

    # -- batches, split over ranks and workers ---------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # Rotate so that this DataLoader's first batch (worker 0) is global batch start_batch.
        logical = (worker + self.start_batch) % workers
        slots = self.world_size * workers
        slot = self.rank * workers + logical
        skip = max(0, -(-(self.start_batch - logical) // workers)) * self.batch_size
        batch: list[Triplet] = []
        for index, (specific, raw) in enumerate(self._mixed(slot, slots)):
            if index < skip:
                continue  # fast-forward: read, do not decode
            batch.append(self._triplet(specific, raw, slot, slots, index))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)
