"""The GPU memory plan: how many copies of each stage's model a worker machine loads onto
its GPU, how large each is, and whether the sum fits; a plan that cannot fit is refused
before the job starts, with the flag that fixes it.

Copies: Beam runs one SDK process per vCPU on Dataflow (Python workers) and each process
loads its own models, unless a stage uses Beam's large-model mode (one copy per machine,
in a server process, shared by all the machine's processes: the captioner on cuda by
default, `--caption-model-copies N` for N). Sizes are parameters x bytes per parameter
(fp16 for the torch models on cuda, fp32 for the ONNX mask model), plus a margin for
activations and generation, plus each process's CUDA context. Pure functions, no GPU needed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

GIB = 2**30
# Parameters of what each stage loads (the whole model: open_clip builds the text tower too).
KNOWN_PARAMS = {
    "Salesforce/blip2-opt-2.7b": 3.85e9,  # ViT-g + Q-Former + OPT-2.7B: ~7.7 GB in fp16
    "Salesforce/blip2-opt-6.7b": 7.75e9,
    "Salesforce/blip2-flan-t5-xl": 3.94e9,
    "Salesforce/blip-image-captioning-base": 2.47e8,
    "Salesforce/blip-image-captioning-large": 4.70e8,
    # The instruction VLMs docs/captioners.md recommends (parameters as their model cards give).
    "google/paligemma2-3b-pt-224": 3.03e9,
    "microsoft/Florence-2-large": 7.7e8,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9,
    "HuggingFaceTB/SmolVLM-256M-Instruct": 2.56e8,
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": 8.9e8,
    "ViT-B-32": 1.51e8,
    "ViT-B-16": 1.50e8,
    "ViT-L-14": 4.28e8,
    "ViT-H-14": 9.86e8,
    "u2net": 4.4e7,
    "u2net_human_seg": 4.4e7,
    "isnet-general-use": 4.4e7,
    "u2netp": 1.1e6,
}
ACTIVATION_MARGIN = 0.25  # x the weights: activations, KV cache, allocator slack (batch <= 32)
CONTEXT_GIB = 0.5  # CUDA context + torch/ORT workspaces per process that touches the GPU
# Memory per accelerator on Dataflow (worker_accelerator=type:...).
ACCELERATOR_GIB = {
    "nvidia-l4": 24.0,
    "nvidia-tesla-t4": 16.0,
    "nvidia-tesla-p4": 8.0,
    "nvidia-tesla-v100": 16.0,
    "nvidia-tesla-p100": 16.0,
    "nvidia-tesla-a100": 40.0,
    "nvidia-a100-80gb": 80.0,
    "nvidia-h100-80gb": 80.0,
    "nvidia-h100-mega-80gb": 80.0,
}


@dataclass(frozen=True)
class StageMemory:
    stage: str
    model: str
    copies: int
    gib_each: Optional[float]  # None: the size could not be estimated
    shared: bool  # large-model mode: copies per machine, not per process

    @property
    def gib(self) -> float:
        return self.copies * (self.gib_each or 0.0)


@dataclass
class GpuPlan:
    processes: int  # SDK processes per worker machine
    capacity_gib: Optional[float]  # the GPU memory of one machine; None if unknown
    stages: list[StageMemory] = field(default_factory=list)
    contexts: int = 0
    where: str = ""  # how processes and capacity were found

    @property
    def total_gib(self) -> float:
        return sum(s.gib for s in self.stages) + self.contexts * CONTEXT_GIB

    @property
    def fits(self) -> bool:
        return self.capacity_gib is None or self.total_gib <= self.capacity_gib


def model_gib(model: str, bytes_per_param: float) -> Optional[float]:
    """Weights plus margin, from the known parameter counts or the size of a local model."""
    if model in KNOWN_PARAMS:
        return KNOWN_PARAMS[model] * bytes_per_param * (1 + ACTIVATION_MARGIN) / GIB
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        size = os.path.getsize(path)
    elif os.path.isdir(path):
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
                   if f.endswith((".safetensors", ".bin", ".pt", ".onnx")))
    else:
        return None
    return size * (1 + ACTIVATION_MARGIN) / GIB  # as stored (usually fp32: an upper bound for fp16)


def _option(args: Sequence[str], name: str) -> list[str]:
    """Values of a Beam option given as --name=V or --name V (repeatable)."""
    values, args = [], list(args)
    for i, arg in enumerate(args):
        if arg == f"--{name}" and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(f"--{name}="):
            values.append(arg.split("=", 1)[1])
    return values


def is_dataflow(beam_args: Sequence[str]) -> bool:
    return any("dataflow" in r.lower() for r in _option(beam_args, "runner"))


def accelerator(beam_args: Sequence[str]) -> Optional[tuple[str, int, bool]]:
    """(type, count, use_nvidia_mps) from --dataflow_service_options worker_accelerator=..."""
    for value in _option(beam_args, "dataflow_service_options"):
        for option in value.split(","):
            if option.strip().startswith("worker_accelerator="):
                parts = dict(p.split(":", 1) if ":" in p else (p, "") for p in option.split("=", 1)[1].split(";"))
                return parts.get("type", ""), int(parts.get("count", "1") or 1), "use_nvidia_mps" in parts
    return None


def processes_per_machine(beam_args: Sequence[str]) -> tuple[int, str]:
    """SDK processes per worker machine, and the reason."""
    experiments = ",".join(_option(beam_args, "experiments"))
    if is_dataflow(beam_args):
        if "no_use_multiple_sdk_containers" in experiments:
            return 1, "Dataflow, one SDK process (no_use_multiple_sdk_containers)"
        machine = (_option(beam_args, "machine_type") or _option(beam_args, "worker_machine_type") or ["n1-standard-1"])[-1]
        match = re.search(r"-(\d+)(?:g|t)?$", machine)
        vcpus = int(match.group(1)) if match else 1
        return vcpus, f"Dataflow {machine}: one SDK process per vCPU"
    workers = _option(beam_args, "direct_num_workers")
    if workers and "multi_processing" in _option(beam_args, "direct_running_mode"):
        return int(workers[-1]), "local runner, multi_processing"
    return 1, "local runner, one process"


def targets_cuda(device: str, beam_args: Sequence[str] = ()) -> bool:
    """Whether the models will run on a GPU: cuda asked for, or auto with a GPU in sight."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    if is_dataflow(beam_args):
        return accelerator(beam_args) is not None
    import torch

    return torch.cuda.is_available()


def local_gpu_gib() -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def make_plan(models: dict[str, str], *, processes: int, capacity_gib: Optional[float],
              caption_copies: Optional[int], where: str = "") -> GpuPlan:
    """models: stage -> model id/path, for caption, embed and mask. caption_copies: the
    large-model copies per machine (None: one copy per process)."""
    plan = GpuPlan(processes=processes, capacity_gib=capacity_gib, where=where)
    for stage, model, bytes_per_param in (("caption", models["caption"], 2), ("embed", models["embed"], 2),
                                          ("mask", models["mask"], 4)):
        shared = stage == "caption" and caption_copies is not None
        copies = caption_copies if shared else processes
        plan.stages.append(StageMemory(stage, model, copies, model_gib(model, bytes_per_param), shared))
    plan.contexts = processes + (caption_copies or 0)  # large-model copies live in their own processes
    return plan


def format_plan(plan: GpuPlan) -> str:
    cap = f"{plan.capacity_gib:.1f} GiB" if plan.capacity_gib is not None else "unknown"
    lines = [f"GPU memory plan ({plan.where}; {plan.processes} process(es) per machine; GPU {cap}):"]
    for s in plan.stages:
        each = f"{s.gib_each:5.2f} GiB" if s.gib_each is not None else "  unknown"
        per = "per machine, shared" if s.shared else "one per process"
        lines.append(f"  {s.stage:8s} {os.path.basename(s.model)[:36]:36s} {s.copies:3d} x {each} = {s.gib:6.2f} GiB  ({per})")
    lines.append(f"  {'contexts':8s} {'CUDA context per process':36s} {plan.contexts:3d} x {CONTEXT_GIB:5.2f} GiB = "
                 f"{plan.contexts * CONTEXT_GIB:6.2f} GiB")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  total {plan.total_gib:.1f} GiB of {cap}: {verdict}")
    return "\n".join(lines)


class PlanDoesNotFit(ValueError):
    pass


def check_plan(plan: GpuPlan, *, dataflow: bool) -> None:
    """Raise PlanDoesNotFit, naming the flags that fix it, if the plan exceeds the GPU."""
    if plan.fits:
        return
    fixes = []
    caption = next(s for s in plan.stages if s.stage == "caption")
    if caption.copies > 1:
        fixes.append(f"--caption-model-copies 1 (the captioner once per machine instead of {caption.copies} copies)")
    if plan.processes > 1:
        if dataflow:
            fixes.append("--experiments=no_use_multiple_sdk_containers (one SDK process per machine: one copy of "
                         "each model; prepare runs on threads, --prepare-threads)")
            fixes.append("a --machine_type with fewer vCPUs, or a GPU with more memory (worker_accelerator type)")
        else:
            fixes.append("a smaller --direct_num_workers")
    fixes.append("--device cpu, or smaller models (--caption-model, --clip-model)")
    raise PlanDoesNotFit(
        f"the models do not fit the GPU: {plan.total_gib:.1f} GiB planned, {plan.capacity_gib:.1f} GiB available.\n"
        + format_plan(plan) + "\nfix with one of:\n  " + "\n  ".join(fixes)
    )


def plan_for_run(config, models, beam_args: Sequence[str]) -> Optional[GpuPlan]:
    """The plan of a `prep run` (None when the models will not run on a GPU)."""
    beam_args = list(beam_args or [])
    if not targets_cuda(config.device, beam_args):
        return None
    processes, where = processes_per_machine(beam_args)
    if is_dataflow(beam_args):
        acc = accelerator(beam_args)
        capacity = ACCELERATOR_GIB.get(acc[0]) * acc[1] if acc and acc[0] in ACCELERATOR_GIB else None
        if acc:
            where += f", {acc[1]} x {acc[0]}" + (" with NVIDIA MPS" if acc[2] else "")
    else:
        capacity = local_gpu_gib()
    copies = caption_copies(config)
    return make_plan({"caption": models.caption_model, "embed": models.clip_model, "mask": models.mask_model},
                     processes=processes, capacity_gib=capacity, caption_copies=copies, where=where)


def caption_copies(config) -> Optional[int]:
    """Large-model copies of the captioner per machine: the flag's, or 1 on cuda by default."""
    if config.caption_model_copies is not None:
        return config.caption_model_copies
    return 1 if targets_cuda(config.device) else None
