"""bench/gpu_check.py runs on CPU with tiny configs of the same architectures (the GPU run
uses the same code with the paper's sizes), and the wheelhouse that carries it to the lent GPU
machine is complete: everything a run loads is in the machine's image or in the lock, and the
lock's requirements, followed down, are too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import wheelhouse

REPO = Path(__file__).resolve().parents[1]

# Runs the check in a fresh interpreter and prints the distributions it loaded (the truth of
# "what the GPU check imports", lazy imports included).
_PROBE = """
import json, sys, importlib.metadata as md
from bench.gpu_check import main
records = main(sys.argv[1:])
by_module = md.packages_distributions()
loaded = sorted({d for m in list(sys.modules) for d in by_module.get(m.split('.')[0], [])})
print("PROBE " + json.dumps({"records": records, "loaded": loaded}))
"""


# Imported when present, not required: Beam tries dill (its extra "dill") and does without it.
OPTIONAL_HERE = {"dill"}


def _requirers_here() -> dict[str, set[str]]:
    """{distribution: the distributions here that require it, extras not asked for} (a
    requirement behind an extra nobody asked for is an optional import, met or not)."""
    import importlib.metadata as md

    found: dict[str, set[str]] = {}
    for dist in md.distributions():
        for req in wheelhouse.wanted(dist.requires or []):
            found.setdefault(wheelhouse.canon(req.name), set()).add(wheelhouse.canon(dist.metadata["Name"]))
    return found


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-check")
    args = ["--device", "cpu", "--tiny", "--threads", "2", "--images", "16", "--caption-images", "8",
            "--max-new-tokens", "4", "--min-seconds", "0.1", "--work", str(work), "--json", str(work / "check.jsonl")]
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))[6:])
    return probe, proc.stdout, work


def test_gpu_check_runs_on_cpu_with_tiny_models(tiny_check):
    probe, out, work = tiny_check
    records = probe["records"]
    assert [r["stage"] for r in records] == ["embed", "mask", "caption"]
    for r in records:
        for key in ("model_ips", "stage_ips", "serial_ips", "zero_ips", "plain_ips"):
            assert r[key] > 0, (r["stage"], key)
    assert records[1]["precision"].endswith("CPU provider")
    assert "stage_ips" in out and "BLIP-2 tiny" in out
    assert len((work / "check.jsonl").read_text().splitlines()) == 3


def test_everything_the_check_loads_is_in_the_image_or_the_wheelhouse(tiny_check):
    """The lent GPU machine has the image's packages and the wheelhouse, nothing else."""
    probe, _, _ = tiny_check
    image, lock = wheelhouse.image_packages(), wheelhouse.read_lock()
    closure = set(wheelhouse.completeness()["followed"]) | {wheelhouse.canon(r.split("[")[0]) for r in wheelhouse.ROOTS}
    loaded = {wheelhouse.canon(d) for d in probe["loaded"]} - {"prep"}
    requirers = {k: v & loaded for k, v in _requirers_here().items()}

    def supplied_there(name: str, seen=()) -> bool:
        """In the image or the lock; or loaded here only as a requirement of this environment's
        own versions of image packages (there, the image's versions bring their own); or an
        optional import that the code takes when present."""
        if name in image or name in lock:
            return True
        if name in seen:
            return False
        if not requirers.get(name):
            return name in OPTIONAL_HERE
        return all(r in image or (r not in lock and supplied_there(r, seen + (name,))) for r in requirers[name])

    missing = sorted(d for d in loaded if not supplied_there(d))
    assert not missing, f"the GPU check loads {missing}: not in the image, not in the wheelhouse lock"
    assert {"apache-beam", "open-clip-torch", "rembg"} <= set(lock) & closure
    # Beam, open_clip and rembg are what the image lacks, and the lock carries them.
    assert {"apache-beam", "open-clip-torch", "rembg"} <= set(lock) & closure


def test_wheelhouse_lock_is_complete_and_fits():
    report = wheelhouse.completeness()
    assert report["missing"] == [] and report["conflicts"] == []
    assert {(p, r.split("<")[0].split(">")[0].split("=")[0]) for p, r, _ in report["waived"]} <= \
        {(a, b) for a, b in wheelhouse.WAIVED}
    lock = wheelhouse.read_lock()
    assert sum(w["size"] for w in lock.values()) <= wheelhouse.LIMIT_BYTES
    for name, entry in lock.items():  # pinned exactly, for cp312 manylinux x86-64 or pure Python
        assert len(entry["sha256"]) == 64 and entry["file"].endswith(".whl"), name
        tags = entry["file"][:-4].split("-")[-3:]
        assert tags[0] in ("py3", "py2.py3", "cp312") or tags[1] == "abi3", entry["file"]
        assert tags[2] == "any" or "x86_64" in tags[2], entry["file"]
    # Every image package named is a real line, and the image is the device entry's list.
    image = wheelhouse.image_packages()
    assert {"torch", "transformers", "onnxruntime", "numpy"} <= set(image) and "apache-beam" not in image


def test_completeness_fails_on_a_planted_gap():
    lock = wheelhouse.read_lock()
    gap = {k: v for k, v in lock.items() if k != "fastavro"}  # Beam needs fastavro
    report = wheelhouse.completeness(lock=gap)
    assert [(p, r.split(">")[0].split("<")[0]) for p, r in report["missing"]] == [("apache-beam", "fastavro")]
    # A version the image has that a requirement excludes is a conflict unless waived.
    image = {**wheelhouse.image_packages(), "protobuf": "7.99.0"}
    assert any("protobuf" in r for _, r, _ in wheelhouse.completeness(image=image)["conflicts"])
    # And a root the image lacks and the lock does not carry.
    assert wheelhouse.completeness(roots=["no-such-dist"])["missing"] == [("(gpu check)", "no-such-dist")]
