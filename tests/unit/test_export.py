"""The student as a diffusers pipeline folder: trained steps and no CFG by default, exact UNet, LoRA."""
import json
import logging
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel
from peft import LoraConfig

import dmdscale
from dmdscale.config import LoraConfig as LoraSettings
from dmdscale.core.sampling import sample
from dmdscale.export import DMD2Scheduler, export_pipeline, lora_state_dict, merged_unet
from dmdscale.models.sd import load_sd_teacher
from dmdscale.models.text_encoders import PromptEncoder
from dmdscale.tools.tiny_sd import POOLED_DIM, TEXT_DIM, build_tiny_pipeline

FOUR_STEP = [999, 749, 499, 249]
CASES = [("sd15", FOUR_STEP), ("sdxl", FOUR_STEP), ("sdxl", [399])]
PROMPT = ["a digit 3"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {f: build_tiny_pipeline(f, root / f) for f in ("sd15", "sdxl")}


def perturbed_unet(teacher, seed: int = 1) -> UNet2DConditionModel:
    """The teacher's UNet, nudged: stands in for a trained student."""
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return unet.eval()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{len(c[1])}step")
def student(request, teachers, tmp_path_factory):
    family, timesteps = request.param
    root = tmp_path_factory.mktemp(f"{family}{len(timesteps)}")
    unet = perturbed_unet(teachers[family])
    source = unet
    if len(timesteps) == 1:  # also exercise a student given as a saved UNet folder
        unet.save_pretrained(root / "trained_unet")
        source = root / "trained_unet"
    out = export_pipeline(teachers[family], family, source, timesteps, root / "student")
    return {"family": family, "timesteps": timesteps, "unet": unet, "out": out}


def unet_inputs(family: str, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    kw = {"sample": torch.randn(n, 4, 16, 16, generator=g), "timestep": torch.tensor([999, 10][:n]),
          "encoder_hidden_states": torch.randn(n, 16, TEXT_DIM * (2 if family == "sdxl" else 1), generator=g)}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(n, POOLED_DIM, generator=g),
                                   "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]] * n)}
    return kw


def run(pipe, **kw) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Latents of `pipe(PROMPT)` and the (timestep, batch size) of every UNet call."""
    calls = []

    def record(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((int(t), len(args[0] if args else kwargs["sample"])))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(0),
                   height=32, width=32, **kw)
    finally:
        handle.remove()
    return out.images, calls


def test_import_dmdscale_stays_cheap():
    code = "import sys, dmdscale; print('diffusers' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "False"]
    assert dmdscale.DMD2Scheduler is DMD2Scheduler  # the lazy attribute diffusers resolves


def test_folder_layout_and_model_index(student):
    out = student["out"]
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["dmdscale", "DMD2Scheduler"]
    assert json.loads((out / "dmdscale.json").read_text()) == {
        "timesteps": student["timesteps"], "guidance_scale": 1.0, "family": student["family"]}
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_pipeline_runs_the_trained_steps_without_guidance(student):
    family, timesteps = student["family"], student["timesteps"]
    pipe = DiffusionPipeline.from_pretrained(student["out"])  # `import dmdscale` above is all it needs
    assert isinstance(pipe.scheduler, DMD2Scheduler)
    latents, calls = run(pipe)
    assert calls == [(t, 1) for t in timesteps]  # trained timesteps, one row per call: no CFG batch
    # dmdscale's own sampler, same initial noise and re-noise draws, no timestep_cond fed to the UNet.
    model = load_sd_teacher(student["out"], family)
    cond = PromptEncoder.load(student["out"], family).encode(PROMPT)
    rng = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 16, 16, generator=rng)
    expected = sample(lambda x, t, c: model(x, t, c), model.schedule, noise, timesteps, cond, rng)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)
    # The pipeline's default guidance (7.5/5.0) and any other scale give the same image as none.
    assert torch.equal(run(pipe, guidance_scale=7.0)[0], latents)
    assert torch.equal(run(pipe, guidance_scale=1.0)[0], latents)
    assert torch.equal(run(pipe, num_inference_steps=2)[0], latents)


def test_exported_unet_equals_the_trained_one(student):
    exported = UNet2DConditionModel.from_pretrained(student["out"], subfolder="unet").eval()
    proj = exported.time_embedding.cond_proj
    assert exported.config.time_cond_proj_dim == 256 and proj.bias is None
    assert not proj.weight.any()
    kw = unet_inputs(student["family"])
    with torch.no_grad():
        want = student["unet"](**kw).sample
        assert torch.equal(exported(**kw).sample, want)
        cond = torch.randn(2, 256, generator=torch.Generator().manual_seed(4))
        assert torch.equal(exported(**kw, timestep_cond=cond).sample, want)


def test_plain_lcm_scheduler_loads_the_config(student):
    out, timesteps = student["out"], student["timesteps"]
    lcm = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    ours = DMD2Scheduler.from_pretrained(out, subfolder="scheduler")
    assert type(lcm) is LCMScheduler and lcm.config.original_inference_steps == 1000
    torch.testing.assert_close(lcm.alphas_cumprod, ours.alphas_cumprod, rtol=0, atol=0)
    lcm.set_timesteps(timesteps=timesteps)
    assert lcm.timesteps.tolist() == timesteps


def test_scheduler_ignores_num_inference_steps_but_not_explicit_timesteps(caplog):
    s = DMD2Scheduler(trained_timesteps=FOUR_STEP)
    with caplog.at_level(logging.INFO, logger="dmdscale.export"):
        s.set_timesteps(50)
        s.set_timesteps(50)
    assert s.timesteps.tolist() == FOUR_STEP
    assert sum("ignoring num_inference_steps=50" in r.message for r in caplog.records) == 1
    s.set_timesteps(timesteps=[999, 499])
    assert s.timesteps.tolist() == [999, 499]
    with pytest.raises(ValueError, match="descending"):
        DMD2Scheduler(trained_timesteps=[249, 999]).set_timesteps(4)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_weights_reproduce_the_merged_student_on_the_teacher(family, teachers, tmp_path):
    teacher = teachers[family]
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").eval()
    base_kw = unet_inputs(family)
    with torch.no_grad():
        base = unet(**base_kw).sample
    # The training default targets: attention, ff, convs, samplers, time projections together.
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LoraSettings().targets,
                                init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        with_lora = unet(**base_kw).sample
    merged = merged_unet(unet)
    assert not any("lora" in n for n, _ in merged.named_modules()) and "lora_B" in str(lora_state_dict(unet).keys())
    out = export_pipeline(teacher, family, merged, FOUR_STEP, tmp_path / "student",
                          lora_state_dict=lora_state_dict(unet), lora_config=unet.peft_config["default"])

    pipe = DiffusionPipeline.from_pretrained(teacher)
    pipe.load_lora_weights(out / "lora")
    (config,) = pipe.unet.peft_config.values()
    assert (config.r, config.lora_alpha) == (4, 8)
    exported = UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    with torch.no_grad():
        got, want = pipe.unet(**base_kw).sample, exported(**base_kw).sample
    torch.testing.assert_close(want, with_lora, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - base).abs().max() > 100 * 1e-4  # the LoRA changes the output: the check has teeth


def test_lora_state_dict_needs_its_config(teachers, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(teachers["sd15"], subfolder="unet")
    with pytest.raises(ValueError, match="lora_config"):
        export_pipeline(teachers["sd15"], "sd15", unet, FOUR_STEP, tmp_path, lora_state_dict={})


def test_missing_teacher_names_the_path(teachers, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(teachers["sd15"], subfolder="unet")
    missing = tmp_path / "no-such-teacher"
    with pytest.raises(FileNotFoundError, match="no-such-teacher"):
        export_pipeline(missing, "sd15", unet, FOUR_STEP, tmp_path / "out")
