"""Check an output directory against the shard contract, version 1 (see contract.py).

`validate_output(out_dir)` reads what a consumer reads -- the manifest, each domain's
sizes.json, every member of every shard, the dead letters -- and collects every problem it
finds rather than stopping at the first, so one run tells a user everything that is wrong.
A corrupt shard is reported and the run goes on with the next one.

All file access goes through Beam's `FileSystems`, so a gs:// output validates exactly like a
local one.

Memory stays bounded on large outputs (hundreds of thousands of samples): shards are
streamed one sample at a time, and no array outlives its sample. The ref checks need every
specific embedding, so instead of keeping the arrays the validator keeps, per specific key,
only its identity and a 20-byte digest of its embedding (`_KeyInfo`), plus the digests of
each refs row; references are resolved once the last shard has been read.

The checks, by concern: `base.py` (state, file access), `manifest.py` (manifest, card,
reconciliation), `folders.py` (sizes, shards, dead letters), `samples.py` (members, refs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from prep.schemas import output
from prep.schemas.contract import SCHEMA_VERSION, TRAIN, shard_folder, split_domains
from prep.schemas.records import DOMAINS, GENERAL, SPECIFIC
from prep.schemas.validate.base import _ManifestInfo, _ValidatorBase
from prep.schemas.validate.folders import _FolderChecks
from prep.schemas.validate.manifest import _ManifestChecks
from prep.schemas.validate.samples import _SampleChecks


@dataclass
class ValidationReport:
    """The outcome of `validate_output`.

    problems: one precise, human-readable message per problem, naming the file and key.
    counts: what was found: samples per domain ("specific", "general"), "dead_lettered"
      (dead-letter lines) and "shards" (tar files read).
    """

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    out_dir: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_output(out_dir: str, *, tolerance: float = 1e-4) -> ValidationReport:
    """Check `out_dir` (local path or any FileSystems URL) against shard contract v1.

    `tolerance` is the allowed deviation of a specific embedding's L2 norm from 1.
    Every problem found is reported; nothing is raised for bad data.
    """
    return _Validator(out_dir, tolerance).run()


def format_report(report: ValidationReport) -> str:
    """A one-line summary, then one line per problem."""
    c = report.counts
    found = (
        f"{c.get(SPECIFIC, 0)} specific, {c.get(GENERAL, 0)} general, "
        f"{c.get('dead_lettered', 0)} dead-lettered in {c.get('shards', 0)} shards"
    )
    where = f"{report.out_dir}: " if report.out_dir else ""
    if report.ok:
        return f"{where}OK: contract v{SCHEMA_VERSION}, {found}"
    n = len(report.problems)
    lines = [f"{where}INVALID: {n} problem{'s' if n != 1 else ''}; found {found}"]
    lines.extend(f"  - {p}" for p in report.problems)
    return "\n".join(lines)



class _Validator(_ManifestChecks, _FolderChecks, _SampleChecks, _ValidatorBase):
    """One validation run: reads everything once and accumulates problems and counts. The
    checks live by concern: manifest.py, folders.py (sizes, shards, dead letters), samples.py."""

    # ------------------------------------------------------------------ the run

    def run(self) -> ValidationReport:
        self.check_temp_files("", list(self.list_files()))
        manifest = self.check_manifest()
        self.check_card(manifest)
        for folder in self.folders(manifest):
            self.check_domain(folder, manifest)
        self.check_refs()
        self.check_dead_letters()
        self.reconcile(manifest)
        if not self.found[SPECIFIC] and not self.found[GENERAL]:
            why = (f"all {self.dead_lettered} input(s) were dead-lettered" if self.dead_lettered
                   else "and no input at all was read")
            self.problem(f"no sample in any shard ({why}): there is nothing to train on")
        counts = {
            SPECIFIC: self.found[SPECIFIC],
            GENERAL: self.found[GENERAL],
            "dead_lettered": self.dead_lettered,
            "shards": self.shards_read,
        }
        return ValidationReport(problems=self.problems, counts=counts, out_dir=self.out_dir)

    def folders(self, manifest: Optional[_ManifestInfo]) -> list[str]:
        """Shard folders: OUT/<domain> (train) and OUT/<split>/<domain> for other splits."""
        found = set(DOMAINS) | set(manifest.shards if manifest is not None else ())
        for split, domain in split_domains():
            if split != TRAIN and output.folder_files(self.out_dir, split, domain):
                found.add(shard_folder(split, domain))
        return sorted(found, key=lambda f: (f.count("/"), f))
