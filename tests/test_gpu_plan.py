"""The GPU memory plan: copies x size per stage against the GPU, refused with the fixing flag."""

from __future__ import annotations

import pytest

from prep.pipeline import gpu_plan
from prep.pipeline.config import RunConfig, resolve_models
from prep.pipeline.gpu_plan import PlanDoesNotFit, check_plan, format_plan, make_plan, plan_for_run

PAPER = {"caption": "Salesforce/blip2-opt-2.7b", "embed": "ViT-L-14", "mask": "u2net"}
L4 = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
DATAFLOW = ["--runner=DataflowRunner", "--machine_type=g2-standard-8", f"--dataflow_service_options={L4}"]


def test_blip2_is_about_7_7_gb_in_fp16():
    weights = gpu_plan.KNOWN_PARAMS[PAPER["caption"]] * 2 / 1e9
    assert 7.5 < weights < 7.9
    assert gpu_plan.model_gib(PAPER["caption"], 2) == pytest.approx(weights * 1e9 * 1.25 / 2**30)


def test_beam_args_give_processes_accelerator_and_mps():
    assert gpu_plan.processes_per_machine(DATAFLOW)[0] == 8
    assert gpu_plan.processes_per_machine(DATAFLOW + ["--experiments=no_use_multiple_sdk_containers"])[0] == 1
    assert gpu_plan.processes_per_machine(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])[0] == 2
    assert gpu_plan.processes_per_machine([])[0] == 1
    assert gpu_plan.accelerator(DATAFLOW) == ("nvidia-l4", 1, False)
    assert gpu_plan.accelerator([f"--dataflow_service_options={L4};use_nvidia_mps"])[2] is True
    assert gpu_plan.targets_cuda("auto", DATAFLOW) and not gpu_plan.targets_cuda("auto", ["--runner=DataflowRunner"])
    assert not gpu_plan.targets_cuda("cpu", DATAFLOW)


def test_eight_processes_each_loading_blip2_are_refused_naming_the_flag():
    plan = make_plan(PAPER, processes=8, capacity_gib=24.0, caption_copies=None, where="test")
    assert [s.copies for s in plan.stages] == [8, 8, 8]
    assert not plan.fits and plan.total_gib > 70
    with pytest.raises(PlanDoesNotFit) as err:
        check_plan(plan, dataflow=True)
    message = str(err.value)
    assert "--caption-model-copies 1" in message
    assert "no_use_multiple_sdk_containers" in message
    assert "24.0 GiB available" in message and "caption" in message


def test_one_shared_captioner_fits_an_l4():
    plan = make_plan(PAPER, processes=8, capacity_gib=24.0, caption_copies=1, where="test")
    caption, embed, mask = plan.stages
    assert caption.copies == 1 and caption.shared and embed.copies == mask.copies == 8
    assert plan.contexts == 9
    assert plan.fits
    check_plan(plan, dataflow=True)  # does not raise
    text = format_plan(plan)
    assert "per machine, shared" in text and "fits" in text


def test_impossible_even_with_one_process_names_smaller_models():
    plan = make_plan(PAPER, processes=1, capacity_gib=8.0, caption_copies=1, where="test")
    with pytest.raises(PlanDoesNotFit, match="--device cpu, or smaller models"):
        check_plan(plan, dataflow=False)


def test_run_config_on_cuda_defaults_to_one_shared_captioner():
    config = RunConfig(inputs=["x"], out="y", preset="paper", device="cuda")
    plan = plan_for_run(config, resolve_models(config), DATAFLOW)
    assert plan is not None and plan.capacity_gib == 24.0
    assert plan.stages[0].copies == 1 and plan.fits
    cpu = RunConfig(inputs=["x"], out="y", preset="paper", device="cpu")
    assert plan_for_run(cpu, resolve_models(cpu), DATAFLOW) is None
    many = RunConfig(inputs=["x"], out="y", preset="paper", device="cuda", caption_model_copies=3)
    assert not plan_for_run(many, resolve_models(many), DATAFLOW).fits


def test_unknown_local_model_is_sized_from_its_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2**20)
    assert gpu_plan.model_gib(str(tmp_path), 2) == pytest.approx(1.25 / 1024)
    assert gpu_plan.model_gib("someone/unknown-model", 2) is None


def test_prep_run_refuses_before_writing_anything(tmp_path, monkeypatch):
    from prep.pipeline.run import run

    from PIL import Image

    (tmp_path / "in" / "id1").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "in" / "id1" / "a.jpg")
    monkeypatch.setattr(gpu_plan, "local_gpu_gib", lambda: 4.0)
    config = RunConfig(inputs=[f"folder:{tmp_path / 'in'}"], out=str(tmp_path / "out"), preset="paper", device="cuda")
    with pytest.raises(PlanDoesNotFit, match="do not fit the GPU"):
        run(config, [])
    assert not (tmp_path / "out").exists()
