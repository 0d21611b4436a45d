"""The GPU machine's wheelhouse: exactly the wheels that the lent GPU machine's image lacks for
`bench/gpu_check.sh`, for its Python (3.12, manylinux x86-64), small enough to travel with the
working tree (at most 60 MiB).

The image (see `bench/gpu_image/packages.txt`, a copy of the device entry's package list) has
torch, transformers, onnxruntime, numpy, pillow, pyarrow, ... but none of Beam, open_clip,
rembg. The wheels are pinned in `bench/gpu_image/wheelhouse.json` with their sha256, size and
declared requirements, so that the completeness check runs offline:

    python -m bench.wheelhouse check             # offline: every requirement met by the image or the lock
    python -m bench.wheelhouse build --dest .whl # downloads exactly the locked wheels (PyPI), checks sha256
    python -m bench.wheelhouse lock              # re-resolves the lock from ROOTS (PyPI; rarely needed)

`bash bench/gpu_check.sh` installs `.whl/` (when the image lacks Beam) with `--no-index
--no-deps` into a venv that sees the image's own packages, then runs the check.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE_LIST = HERE / "gpu_image" / "packages.txt"
LOCK = HERE / "gpu_image" / "wheelhouse.json"
LIMIT_BYTES = 60 * 1024 * 1024
PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_5_x86_64"]
# What the GPU check imports, as distributions (tests/test_gpu_check.py checks this against the
# modules a real run loads). rembg's `cpu` extra is its onnxruntime.
ROOTS = ["apache-beam", "open-clip-torch", "rembg[cpu]", "torch", "torchvision", "transformers", "onnxruntime",
         "onnx", "numpy", "pillow", "pyarrow", "safetensors", "huggingface-hub"]
# A requirement the image's known version does not meet, accepted on purpose: Beam 2.77 caps
# numpy below 2.5 as a tested range, not an API break; the image's numpy (2.5.x) is kept since its
# compiled packages (torch, onnxruntime, opencv) were built against it. The GPU check exercises it.
WAIVED = {("apache-beam", "numpy")}
MARKER_ENV = {"python_version": PYTHON, "python_full_version": PYTHON + ".3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """{canonical name: version or None} of the GPU image (lines `name` or `name==version`)."""
    found: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canon(name)] = version.strip() or None
    return found


def read_lock(path: Path = LOCK) -> dict[str, dict]:
    return {canon(k): v for k, v in json.loads(path.read_text())["wheels"].items()}


def wanted(requirements: list[str], extras: tuple[str, ...] = ()):
    """The requirements that apply on the GPU machine's Python, with `extras` asked for."""
    from packaging.requirements import Requirement

    for text in requirements:
        req = Requirement(text)
        if req.marker is None:
            yield req
            continue
        for extra in ("",) + tuple(extras):
            if req.marker.evaluate({**MARKER_ENV, "extra": extra}):
                yield req
                break


def completeness(roots=ROOTS, image=None, lock=None) -> dict:
    """Follows every root's requirements down through the lock's wheels: each must be in the
    image or the lock, and a version known on both sides must meet the specifier. Returns
    {missing: [(needed_by, requirement)], conflicts: [...], waived: [...], followed: [names]}."""
    from packaging.requirements import Requirement

    image = image_packages() if image is None else image
    lock = read_lock() if lock is None else lock
    missing, conflicts, waived, followed = [], [], [], []
    queue = [("(gpu check)", Requirement(r)) for r in roots]
    seen: set[tuple[str, tuple]] = set()
    while queue:
        parent, req = queue.pop(0)
        name = canon(req.name)
        extras = tuple(sorted(req.extras))
        if name in lock:
            version = lock[name]["version"]
        elif name in image:
            version = image[name]
        else:
            missing.append((parent, str(req)))
            continue
        if version is not None and req.specifier and not req.specifier.contains(version, prereleases=True):
            item = (parent, str(req), f"{name} {version}")
            (waived if (canon(parent), name) in WAIVED else conflicts).append(item)
        if (name, extras) in seen or name not in lock:
            continue  # the image's own packages are taken as installed with their requirements
        seen.add((name, extras))
        followed.append(name)
        for sub in wanted(lock[name]["requires"], extras):
            queue.append((name, sub))
    return {"missing": missing, "conflicts": conflicts, "waived": waived, "followed": sorted(set(followed))}


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def _download(spec: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           PYTHON, "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for platform in PLATFORMS + ["any"]:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [spec], check=True)
    new = set(dest.glob("*.whl")) - before
    if not new:  # already there: find it by name and version
        name, _, version = spec.partition("==")
        stem = canon(name).replace("-", "_")
        new = {p for p in dest.glob("*.whl") if canon(p.name.split("-")[0]).replace("-", "_") == stem
               and (not version or p.name.split("-")[1] == version)}
    return sorted(new)[-1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock(dest: Path, prefer: dict[str, str] | None = None) -> dict:
    """Resolves the lock from ROOTS: every requirement the image lacks is downloaded (the version
    in `prefer`, e.g. the project's own environment, when it meets the requirement; else the
    newest that does) and followed. Needs PyPI."""
    from packaging.requirements import Requirement

    image = image_packages()
    prefer = {canon(k): v for k, v in (prefer or {}).items()}
    wheels: dict[str, dict] = {}
    queue = [Requirement(r) for r in ROOTS]
    while queue:
        req = queue.pop(0)
        name = canon(req.name)
        if name in image or name in wheels:
            continue
        version = prefer.get(name)
        spec = f"{req.name}=={version}" if version and req.specifier.contains(version, prereleases=True) \
            else f"{req.name}{req.specifier}"
        wheel = _download(spec, dest)
        meta = _metadata(wheel)
        requires = meta.get_all("Requires-Dist") or []
        wheels[name] = {"version": meta["Version"], "file": wheel.name, "sha256": _sha256(wheel),
                        "size": wheel.stat().st_size, "requires": requires}
        queue.extend(wanted(requires, tuple(req.extras)))
    total = sum(w["size"] for w in wheels.values())
    return {"python": PYTHON, "platforms": PLATFORMS, "roots": ROOTS, "total_bytes": total,
            "wheels": dict(sorted(wheels.items()))}


def build(dest: Path) -> list[Path]:
    """Downloads exactly the locked wheels into dest and checks each one's sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    locked = read_lock()
    paths = []
    for name, entry in locked.items():
        path = dest / entry["file"]
        if not (path.is_file() and _sha256(path) == entry["sha256"]):
            path = _download(f"{name}=={entry['version']}", dest)
        if _sha256(path) != entry["sha256"]:
            raise SystemExit(f"{path.name}: sha256 differs from the lock")
        paths.append(path)
    stray = sorted(set(dest.glob("*.whl")) - set(paths))
    for path in stray:
        path.unlink()
    total = sum(p.stat().st_size for p in paths)
    if total > LIMIT_BYTES:
        raise SystemExit(f"wheelhouse is {total / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB limit")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="offline: the lock and the image meet every requirement")
    b = sub.add_parser("build", help="download the locked wheels (PyPI)")
    b.add_argument("--dest", type=Path, default=HERE.parent / ".whl")
    lk = sub.add_parser("lock", help="re-resolve the lock from ROOTS (PyPI)")
    lk.add_argument("--prefer-installed", action="store_true",
                    help="take this environment's installed versions where they fit")
    args = parser.parse_args(argv)
    if args.command == "lock":
        prefer = {}
        if args.prefer_installed:
            import importlib.metadata as md

            prefer = {d.metadata["Name"]: d.version for d in md.distributions()}
        with tempfile.TemporaryDirectory() as tmp:
            result = lock(Path(tmp), prefer)
        LOCK.write_text(json.dumps(result, indent=1) + "\n")
        print(f"locked {len(result['wheels'])} wheels, {result['total_bytes'] / 2**20:.1f} MiB -> {LOCK}")
        return 0
    if args.command == "build":
        paths = build(args.dest)
        print(f"{len(paths)} wheels, {sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB in {args.dest}")
        return 0
    report = completeness()
    for parent, req in report["missing"]:
        print(f"missing: {req} (needed by {parent})")
    for parent, req, have in report["conflicts"]:
        print(f"conflict: {parent} needs {req}, has {have}")
    for parent, req, have in report["waived"]:
        print(f"waived: {parent} needs {req}, has {have}")
    total = sum(w["size"] for w in read_lock().values())
    print(f"{len(read_lock())} locked wheels, {total / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f}); "
          f"followed {len(report['followed'])}; missing {len(report['missing'])}; "
          f"conflicts {len(report['conflicts'])}")
    return 1 if report["missing"] or report["conflicts"] or total > LIMIT_BYTES else 0


if __name__ == "__main__":
    raise SystemExit(main())
