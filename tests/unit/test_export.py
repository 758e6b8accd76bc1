"""The student as a diffusers pipeline folder that stock diffusers loads: trained steps from the
ordinary call, no CFG, exact UNet, LoRA in peft and kohya layouts, model card, fp16 variant."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel
from peft import LoraConfig

from dmdscale.config import LoraConfig as LoraSettings
from dmdscale.core.sampling import sample
from dmdscale.export import STUDENT_INFO, lora_state_dict, merged_unet, sampling_call, write_model_card
from dmdscale.families.sd.export import export_pipeline
from dmdscale.families.sd.model import load_sd_teacher
from dmdscale.models.text_encoders import PromptEncoder
from dmdscale.families.sd.tiny import POOLED_DIM, TEXT_DIM, build_tiny_pipeline

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
    call = json.loads((out / STUDENT_INFO).read_text())["call"]
    return {"family": family, "timesteps": timesteps, "unet": unet, "out": out, "call": call}


def unet_inputs(family: str, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    kw = {"sample": torch.randn(n, 4, 16, 16, generator=g), "timestep": torch.tensor([999, 10][:n]),
          "encoder_hidden_states": torch.randn(n, 16, TEXT_DIM * (2 if family == "sdxl" else 1), generator=g)}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(n, POOLED_DIM, generator=g),
                                   "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]] * n)}
    return kw


def dmdscale_latents(student: dict) -> torch.Tensor:
    """dmdscale's own sampler on the exported folder: the same initial noise and re-noise draws
    as `run` (one generator seeded 0), no timestep_cond fed to the UNet."""
    family, out = student["family"], student["out"]
    model = load_sd_teacher(out, family)
    cond = PromptEncoder.load(out, family).encode(PROMPT)
    rng = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 16, 16, generator=rng)
    return sample(lambda x, t, c: model(x, t, c), model.schedule, noise, student["timesteps"], cond, rng)


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


def test_folder_layout_and_model_index(student):
    out = student["out"]
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]
    assert json.loads((out / "dmdscale.json").read_text()) == {
        "timesteps": student["timesteps"], "call": sampling_call(student["timesteps"]), "guidance_scale": 1.0,
        "family": student["family"]}
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_pipeline_runs_the_trained_steps_without_guidance(student):
    timesteps, call = student["timesteps"], student["call"]
    pipe = DiffusionPipeline.from_pretrained(student["out"])
    assert type(pipe.scheduler) is LCMScheduler
    latents, calls = run(pipe, **call)
    assert calls == [(t, 1) for t in timesteps]  # trained timesteps, one row per call: no CFG batch
    torch.testing.assert_close(latents, dmdscale_latents(student), rtol=1e-4, atol=1e-5)
    # The pipeline's default guidance (7.5/5.0) and any other scale give the same image as none.
    assert torch.equal(run(pipe, guidance_scale=7.0, **call)[0], latents)
    assert torch.equal(run(pipe, guidance_scale=1.0, **call)[0], latents)


STOCK_DIFFUSERS = """
import json, sys
import torch
from diffusers import DiffusionPipeline
folder, out = sys.argv[1], sys.argv[2]
call = json.load(open(folder + "/dmdscale.json"))["call"]  # what the model card prints
pipe = DiffusionPipeline.from_pretrained(folder)
latents = pipe(["a digit 3"], height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0), **call).images
assert not any(m.split(".")[0] == "dmdscale" for m in sys.modules), "dmdscale was imported"
torch.save({"latents": latents, "scheduler": type(pipe.scheduler).__name__}, out)
"""


def test_stock_diffusers_loads_and_samples_it_without_dmdscale(student, tmp_path):
    """A fresh process with diffusers and no dmdscale: from_pretrained, the documented call, and
    the latents of dmdscale's own sampler on the same noise."""
    proc = subprocess.run([sys.executable, "-c", STOCK_DIFFUSERS, str(student["out"]), str(tmp_path / "l.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "l.pt")
    assert got["scheduler"] == "LCMScheduler"
    torch.testing.assert_close(got["latents"], dmdscale_latents(student), rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("timesteps, call", [
    ([999, 749, 499, 249], {"num_inference_steps": 4}), ([999], {"num_inference_steps": 1}),
    ([999, 499], {"num_inference_steps": 2}), ([399], {"timesteps": [399]}),
    ([999, 749, 249], {"timesteps": [999, 749, 249]}),
])
def test_sampling_call_uses_the_ordinary_call_where_lcm_gives_the_trained_steps(timesteps, call):
    assert sampling_call(timesteps) == call
    lcm = LCMScheduler(original_inference_steps=call.get("num_inference_steps", 1000))
    lcm.set_timesteps(**call)
    assert lcm.timesteps.tolist() == timesteps


def test_model_card_parses_and_names_the_call(student, tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "README.md").write_text("---\nlicense: openrail++\n---\n# a teacher\n")
    card = write_model_card(student["out"], family=student["family"], teacher=str(tmp_path / "teacher"),
                            timesteps=student["timesteps"], usage="pipe(prompt, timesteps=[399])",
                            metrics={"fid_student": 12.345678, "fid_skipped": "no weights"},
                            config={"train.lr": 1e-5}, pipeline_tag="text-to-image").read_text()
    _, front, body = card.split("---", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "diffusers" and meta["license"] == "openrail++"
    assert meta["dmdscale"] == {"family": student["family"], "timesteps": student["timesteps"]}
    assert "pipe(prompt, timesteps=[399])" in body and "| `fid_student` | 12.35 |" in body
    assert "train.lr: 1e-05" in body and str(student["timesteps"]) in body


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

    exported = UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    with torch.no_grad():
        want = exported(**base_kw).sample
    torch.testing.assert_close(want, with_lora, rtol=1e-4, atol=1e-5)
    for layout in ("lora", "lora_kohya"):  # peft keys; kohya keys (ComfyUI, A1111-style tools)
        pipe = DiffusionPipeline.from_pretrained(teacher)
        pipe.load_lora_weights(out / layout)
        with torch.no_grad():
            got = pipe.unet(**base_kw).sample
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=layout)
    (config,) = pipe.unet.peft_config.values()
    assert config.r == 4
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


def test_fp16_variant_loads_in_half_precision(teachers, tmp_path):
    unet = perturbed_unet(teachers["sd15"])
    out = export_pipeline(teachers["sd15"], "sd15", unet, FOUR_STEP, tmp_path / "student", fp16_variant=True)
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # the fp32 weights stay
    half = DiffusionPipeline.from_pretrained(out, variant="fp16", dtype=torch.float16)
    assert half.unet.dtype == torch.float16
    assert unet.dtype == torch.float32  # the caller's UNet is not rounded in place
    # A plain load is fp32 throughout and samples: the variant left every config as the fp32 save wrote it.
    plain = DiffusionPipeline.from_pretrained(out)
    assert plain.text_encoder.dtype == plain.unet.dtype == torch.float32
    plain.set_progress_bar_config(disable=True)
    assert plain("a cat", num_inference_steps=1, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)
    full = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    kw = unet_inputs("sd15")
    with torch.no_grad():
        torch.testing.assert_close(half.unet.float()(**kw).sample, full(**kw).sample, rtol=1e-2, atol=1e-2)



# -- what is published names no secret and nothing of this machine (issue 37) ------------------

SECRET = "SECRETzq81x"


def _holding(folder, needle: str) -> list[str]:
    """The files under `folder` (binary ones too) whose bytes contain `needle`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and needle.encode() in p.read_bytes())


def test_model_card_masks_secrets_and_names_no_local_path(tmp_path):
    teacher = tmp_path / "teachers" / "my-teacher"
    teacher.mkdir(parents=True)
    (teacher / "README.md").write_text("---\nlicense: openrail++\n---\n")
    (tmp_path / "student").mkdir()
    card = write_model_card(tmp_path / "student", family="sd15", teacher=str(teacher), timesteps=[999],
                            usage=f'pipe = DiffusionPipeline.from_pretrained("{tmp_path}/student")',
                            metrics={"fid_student": 1.5, "where": f"{tmp_path}/run"},
                            config={"scale.storage_path": f"s3://b/r?secret_key={SECRET}",
                                    "data.path": f"{tmp_path}/data/train.parquet", "model.teacher": str(teacher)},
                            pipeline_tag="text-to-image").read_text()
    assert SECRET not in card and 'scale.storage_path: "s3://b/r?secret_key=***"' in card
    assert str(tmp_path) not in card and str(Path.home()) not in card
    assert "student of `my-teacher`" in card and "from the sd15 teacher `my-teacher`" in card
    assert 'data.path: "train.parquet"' in card and 'from_pretrained("student")' in card
    meta = yaml.safe_load(card.split("---", 2)[1])
    assert meta["license"] == "openrail++" and "base_model" not in meta  # a local folder is no hub model
    hub = write_model_card(tmp_path / "student", family="sd15", teacher="stabilityai/sdxl-turbo", timesteps=[999],
                           usage="", metrics={}, config={}, pipeline_tag="text-to-image").read_text()
    assert yaml.safe_load(hub.split("---", 2)[1])["base_model"] == "stabilityai/sdxl-turbo"


def test_hub_cache_teacher_is_named_by_its_hub_id(tmp_path):
    snapshot = tmp_path / "hub" / "models--stabilityai--sdxl-turbo" / "snapshots" / "71153311"
    snapshot.mkdir(parents=True)
    (tmp_path / "student").mkdir()
    card = write_model_card(tmp_path / "student", family="sdxl", teacher=str(snapshot), timesteps=[999],
                            usage="", metrics={}, config={"model.teacher": str(snapshot)},
                            pipeline_tag="text-to-image").read_text()
    assert "student of `stabilityai/sdxl-turbo`" in card and str(tmp_path) not in card
    assert yaml.safe_load(card.split("---", 2)[1])["base_model"] == "stabilityai/sdxl-turbo"


def test_sd_family_card_names_the_teacher_folder_not_its_path(teachers, tmp_path):
    """The family's writer (teacher = the run's inputs.teacher_path, the usage with the teacher for
    a LoRA run, the whole config) through to the card."""
    from dmdscale.families import resolve
    from dmdscale.contracts import RunInputs, Trained
    from conftest import text_cfg

    teacher = str(teachers["sd15"])
    cfg = text_cfg("sd15", teacher, **{"lora.enabled": True, "scale.storage_path": f"s3://b/r?token={SECRET}",
                                      "data.path": str(tmp_path / "data" / "train.parquet")})
    student = tmp_path / "run" / "student"
    student.mkdir(parents=True)
    (student / STUDENT_INFO).write_text(json.dumps({"call": {"num_inference_steps": 4}}))
    resolve(cfg).write_model_card(cfg, RunInputs("x", "y", teacher), Trained(student, {}, []), {"fid_student": 3.0})
    card = (student / "README.md").read_text()
    assert SECRET not in card and str(tmp_path) not in card and teacher not in card
    assert f"student of `{Path(teacher).name}`" in card
    assert 'from_pretrained("student")' in card and f"from_pretrained('{Path(teacher).name}')" in card


def test_exported_pipeline_names_nothing_of_this_machine(student, teachers, tmp_path_factory):
    """diffusers and transformers write where each part was loaded from (`_name_or_path`): not in
    a folder that is published. The tokenizers' own strings (`<|endoftext|>`, `</w>`) stay as they were."""
    out = student["out"]
    assert _holding(out, str(tmp_path_factory.getbasetemp())) == []
    assert all("_name_or_path" not in json.loads(p.read_text()) for p in out.rglob("*.json"))
    teacher = teachers[student["family"]]
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        for theirs in teacher.glob(f"tokenizer*/{name}"):
            assert (out / theirs.parent.name / name).read_bytes() == theirs.read_bytes(), theirs
    for theirs in teacher.glob("tokenizer*/tokenizer_config.json"):
        ours = json.loads((out / theirs.parent.name / theirs.name).read_text())
        assert all(ours[k] == v for k, v in json.loads(theirs.read_text()).items() if k != "name_or_path")
    pipe = DiffusionPipeline.from_pretrained(out)  # still loads and samples
    assert pipe.unet.config.time_cond_proj_dim and pipe.tokenizer.eos_token == "<|endoftext|>"


def test_exported_pixel_unet_names_nothing_of_this_machine(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    from dmdscale.families.unet2d.export import export_unet_student
    from dmdscale.families.unet2d.model import load_unet, tiny_unet_config

    teacher = tmp_path / "teacher"
    UNet2DModel(**tiny_unet_config(16, 1, 10, 8)).save_pretrained(teacher / "unet")
    DDPMScheduler().save_pretrained(teacher / "scheduler")
    generator = load_unet(teacher)
    assert str(teacher) in generator.unet.config._name_or_path  # what diffusers would write out
    out = export_unet_student(generator, [999], tmp_path / "run" / "student")
    assert _holding(out, str(tmp_path)) == [] and _holding(out, str(Path.home())) == []
    assert "_name_or_path" not in json.loads((out / "unet" / "config.json").read_text())
    assert UNet2DModel.from_pretrained(out, subfolder="unet").config.num_class_embeds == 11
