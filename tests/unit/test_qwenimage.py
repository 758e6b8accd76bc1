"""qwenimage on a tiny random-weight Qwen-Image pipeline: the folder stock diffusers samples, the
Denoiser's arithmetic against QwenImagePipeline's own (packing, timestep, text mask, CFG input), the
discriminator's token features, the VAE latents, the student pipeline and its export, and the
published 20B transformer on the meta device."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dmdscale.core.networks import Critic
from dmdscale.families.qwenimage.export import export_qwen_pipeline, student_pipeline
from dmdscale.families.qwenimage.model import (check_qwen_folder, decode_latents, encode_latents, image_seq_len,
                                               latent_shape, load_qwen_teacher)
from dmdscale.families.qwenimage.text import NEGATIVE_PROMPT, QwenPromptEncoder
from dmdscale.families.qwenimage.tiny import LATENTS_MEAN, SCHEDULER_CONFIG, build_tiny_qwen_pipeline
from dmdscale.models.heads import TokenHead

PROMPTS = ["a red circle on a blue square", "a cat"]  # different lengths: the pipeline's own batch is padded
LENGTH = 40  # the fixed text length of these tests (longer than any prompt here: 27 and 10 tokens)
VAE_SCALE = 4  # the tiny VAE's downsampling: 32 px -> 8x8 latents -> 4x4 tokens


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> str:
    return str(build_tiny_qwen_pipeline(tmp_path_factory.mktemp("tiny_qwen") / "pipe"))


@pytest.fixture(scope="module")
def teacher(tiny_qwen):
    return load_qwen_teacher(tiny_qwen, 32, feature_depths=[1, 2])


@pytest.fixture(scope="module")
def encoder(tiny_qwen):
    return QwenPromptEncoder.load(tiny_qwen, max_sequence_length=LENGTH)


def pipeline_of(folder: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_tiny_folder_samples_with_stock_diffusers_and_drops_the_template_prefix(tiny_qwen):
    from diffusers import QwenImagePipeline

    pipe = pipeline_of(tiny_qwen)
    assert isinstance(pipe, QwenImagePipeline)
    image = pipe("a red circle", height=32, width=32, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and (image >= 0).all() and (image <= 1).all()
    assert {k: pipe.scheduler.config[k] for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG
    assert list(pipe.vae.config.latents_mean) == LATENTS_MEAN and pipe.vae.config.z_dim == 16
    # The template's system prefix is exactly what encode_prompt drops: the kept tokens are the prompt's.
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    prefix = pipe.tokenizer(template.split("{}")[0]).input_ids
    full = pipe.tokenizer(template.format("a cat")).input_ids
    assert len(prefix) == drop and full[:drop] == prefix
    assert pipe.tokenizer.decode(full[drop:]).startswith("a cat<|im_end|>")
    embeds, _ = pipe.encode_prompt("a cat", device="cpu")
    assert embeds.shape[1] == len(full) - drop


def test_one_step_from_pure_noise_is_the_pipelines_own_euler_step(tiny_qwen, teacher, encoder):
    """At t = 999 (sigma 1) one Euler step of the pipeline lands on x0 = x - v: the Denoiser, fed
    the fixed-length padded embeddings, must give the latents the pipeline computes from its own
    unpadded ones (packing, sigma as timestep, image grid, text mask)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = pipeline_of(tiny_qwen)
    # shift_terminal stretches the last sigma to 0.02 and a 1-step schedule to 0 / 0: the student's
    # scheduler drops it, and so does this one-step reference.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    x = noise(2, 16, 8, 8)
    packed = pipe(prompt=PROMPTS, latents=QwenImagePipeline._pack_latents(x, 2, 16, 8, 8), height=32, width=32,
                  num_inference_steps=1, output_type="latent").images
    expected = QwenImagePipeline._unpack_latents(packed, 32, 32, VAE_SCALE)[:, :, 0]
    with torch.no_grad():
        got = teacher(x, torch.full((2,), 999), encoder.encode(PROMPTS))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_predict_is_the_transformer_call_of_the_pipeline_and_padding_is_masked(teacher, encoder):
    from diffusers import QwenImagePipeline

    x, t = noise(2, 16, 8, 8), torch.tensor([500, 100])
    embeds, mask = encoder.encode_unpadded(PROMPTS)  # the pipeline's own: (2, longest, D), int64 mask
    assert mask is not None and mask.dtype == torch.int64 and embeds.shape[1] < LENGTH
    sigma = teacher.schedule.flow_sigmas[t].float()
    with torch.no_grad():
        packed = teacher.transformer(hidden_states=QwenImagePipeline._pack_latents(x, 2, 16, 8, 8), timestep=sigma,
                                     encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                     img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]
        expected = QwenImagePipeline._unpack_latents(packed, 32, 32, VAE_SCALE)[:, :, 0]
        cond = encoder.encode(PROMPTS)
        assert cond["prompt_embeds"].shape == (2, LENGTH, 32) and cond["prompt_embeds_mask"].dtype == torch.float32
        assert cond["prompt_embeds_mask"].sum(1).tolist() == mask.sum(1).tolist()
        torch.testing.assert_close(teacher.predict(x, t, cond), expected, rtol=1e-5, atol=1e-5)
        unmasked = cond | {"prompt_embeds_mask": torch.ones_like(cond["prompt_embeds_mask"])}
        assert not torch.allclose(teacher.predict(x, t, unmasked), expected, atol=1e-3)
    # Rows of different batches stack: a prompt encodes alike alone and beside a longer one.
    alone = encoder.encode(PROMPTS[1:])
    torch.testing.assert_close(alone["prompt_embeds"], cond["prompt_embeds"][1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone["prompt_embeds_mask"], cond["prompt_embeds_mask"][1:])


def test_null_cond_is_the_negative_prompt_and_cfg_mixes_x0(teacher, encoder):
    cond = encoder.encode(PROMPTS)
    null = teacher.null_cond(cond)
    negative = encoder.encode([NEGATIVE_PROMPT] * 2)
    assert null.keys() == cond.keys()
    for key in cond:
        torch.testing.assert_close(null[key], negative[key], rtol=1e-5, atol=1e-6)
    x, t, g = noise(2, 16, 8, 8), torch.tensor([700, 200]), 4.0
    with torch.no_grad():
        x0_cond, x0_uncond = teacher(x, t, cond), teacher(x, t, null)
        guided = teacher(x, t, cond, guidance_scale=g)
    torch.testing.assert_close(guided, x0_uncond + g * (x0_cond - x0_uncond), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(guided, x0_cond, atol=1e-3)


def test_token_features_are_the_blocks_outputs_in_the_order_asked(tiny_qwen, teacher, encoder):
    cond = encoder.encode(PROMPTS)
    x, t = noise(2, 16, 8, 8), torch.tensor([999, 100])
    outputs = []
    hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o[1])) for block in teacher.blocks]
    try:
        with torch.no_grad():
            teacher.predict(x, t, cond)  # the whole forward, as the pipeline runs it
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        features = teacher.features(x, t, cond)
    assert features.shape == (2, 2, 16, teacher.feature_width)  # 4x4 tokens of 2x2-packed latents
    torch.testing.assert_close(features, torch.stack(outputs, dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(features[:, 0], features[:, 1])
    reversed_ = load_qwen_teacher(tiny_qwen, 32, feature_depths=[2, 1])
    with torch.no_grad():
        torch.testing.assert_close(reversed_.features(x, t, cond), features.flip(1), rtol=1e-5, atol=1e-5)
    # Gradient checkpointing recomputes the same blocks.
    reversed_.requires_grad_(True).enable_gradient_checkpointing()
    torch.testing.assert_close(reversed_.features(x, t, cond).detach(), features.flip(1), rtol=1e-5, atol=1e-5)
    logits = Critic(teacher, TokenHead.for_model(teacher))(x, t, cond)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="gan_feature_depths"):
        load_qwen_teacher(tiny_qwen, 32, feature_depths=[teacher.num_blocks + 1])


def test_step_embedding_conditions_the_time_embedding(tiny_qwen, encoder):
    model = load_qwen_teacher(tiny_qwen, 32)  # its own: the critic hooks its time embedding
    cond = encoder.encode(PROMPTS)
    x, t = noise(2, 16, 8, 8), torch.tensor([999, 100])
    layer, width = model.time_embedding_layer()
    assert layer is model.transformer.time_text_embed and width == model.feature_width == 32
    critic = Critic(model, TokenHead.for_model(model), 2)
    with torch.no_grad():
        shared = critic.fake_score(x, t, cond)
        critic.step_embedding.weight[1] = 0.5
        with critic.at_step(0):
            torch.testing.assert_close(critic.fake_score(x, t, cond), shared, rtol=0, atol=0)
        with critic.at_step(1):
            assert not torch.allclose(critic.fake_score(x, t, cond), shared, atol=1e-4)


def test_vae_latents_are_the_normalised_mean_and_decode_as_the_pipeline_does(tiny_qwen):
    from diffusers import QwenImagePipeline

    pipe = pipeline_of(tiny_qwen)
    images = noise(2, 3, 32, 32).clamp(-1, 1)
    latents = encode_latents(pipe.vae, images)
    assert latents.shape == (2, *latent_shape(tiny_qwen, 32)) == (2, 16, 8, 8)
    with torch.no_grad():
        mean = pipe.vae.encode(images.unsqueeze(2)).latent_dist.mean[:, :, 0]
    std, shift = torch.tensor(pipe.vae.config.latents_std), torch.tensor(pipe.vae.config.latents_mean)
    torch.testing.assert_close(latents, (mean - shift.view(1, 16, 1, 1)) / std.view(1, 16, 1, 1))
    # The pipeline decodes whatever its last step leaves: hand it these latents, packed.
    replace = lambda p, i, t, kwargs: {"latents": QwenImagePipeline._pack_latents(latents, 2, 16, 8, 8)}  # noqa: E731
    decoded = pipe(prompt=PROMPTS, height=32, width=32, num_inference_steps=2, output_type="pt",
                   callback_on_step_end=replace).images
    torch.testing.assert_close((decode_latents(pipe.vae, latents) / 2 + 0.5).clamp(0, 1), decoded,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("timesteps", [[999], [999, 749, 499, 249]])
def test_student_pipeline_steps_exactly_the_trained_sigmas(tiny_qwen, teacher, timesteps):
    pipe, call = student_pipeline(tiny_qwen, timesteps, 32)
    pipe.set_progress_bar_config(disable=True)
    assert call == {"num_inference_steps": len(timesteps), "true_cfg_scale": 1.0}
    assert image_seq_len(32, VAE_SCALE) == 16
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    # The model card's negative prompt " " must not turn on a second (CFG) pass around the student.
    pipe("a cat", negative_prompt=NEGATIVE_PROMPT, height=32, width=32, output_type="latent", **call)
    hook.remove()
    trained = teacher.schedule.flow_sigmas[torch.tensor(timesteps)].float()
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], trained, rtol=0, atol=1e-6)
    assert len(seen) == len(timesteps)
    torch.testing.assert_close(torch.cat(seen), trained, rtol=0, atol=1e-6)  # the transformer's timestep input


def test_export_loads_and_samples_with_the_recorded_call(tiny_qwen, tmp_path):
    from diffusers import DiffusionPipeline, QwenImagePipeline
    from peft import LoraConfig, get_peft_model_state_dict

    student = pipeline_of(tiny_qwen).transformer
    with torch.no_grad():
        student.proj_out.bias.add_(0.25)  # a student that differs from the teacher
    student.save_pretrained(tmp_path / "trained")
    lora = pipeline_of(tiny_qwen).transformer
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    lora.add_adapter(config)
    out = export_qwen_pipeline(tiny_qwen, tmp_path / "trained", [999, 749, 499, 249], tmp_path / "student", 32,
                               lora_state_dict=get_peft_model_state_dict(lora), lora_config=config, fp16_variant=True)
    info = json.loads((out / "dmdscale.json").read_text())
    assert info == {"timesteps": [999, 749, 499, 249], "call": {"num_inference_steps": 4, "true_cfg_scale": 1.0},
                    "guidance_scale": 1.0, "family": "qwenimage", "resolution": 32}
    pipe = pipeline_of(str(out))
    assert isinstance(pipe, QwenImagePipeline)
    assert pipe.scheduler.config.stochastic_sampling and not pipe.scheduler.config.shift_terminal
    torch.testing.assert_close(pipe.transformer.proj_out.bias, student.proj_out.bias)
    image = pipe("a cat", height=32, width=32, output_type="np", **info["call"]).images
    assert image.shape == (1, 32, 32, 3)
    half = DiffusionPipeline.from_pretrained(str(out), variant="fp16", dtype=torch.float16)
    assert half.transformer.dtype == half.text_encoder.dtype == torch.float16
    torch.testing.assert_close(half.transformer.proj_out.bias.float(), student.proj_out.bias, rtol=1e-3, atol=1e-3)
    teacher_pipe = pipeline_of(tiny_qwen)
    teacher_pipe.load_lora_weights(str(out / "lora"))
    assert any("lora" in name for name, _ in teacher_pipe.transformer.named_parameters())
    local = (str(tmp_path), tiny_qwen)
    for path in out.rglob("*.json"):
        text = path.read_text()
        assert not any(p in text for p in local), f"{path.relative_to(out)} holds a local path"


def test_check_qwen_folder_names_the_missing_file_and_loading_errors_name_the_folder(tiny_qwen, tmp_path):
    from dmdscale.errors import TeacherNotFound

    assert check_qwen_folder("Qwen/Qwen-Image") == "Qwen/Qwen-Image"  # a hub id passes through
    assert check_qwen_folder(tiny_qwen) == tiny_qwen
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen, broken)
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(TeacherNotFound, match=r"broken.*missing vae/config\.json"):
        check_qwen_folder(broken)
    shutil.copy(tiny_qwen + "/vae/config.json", broken / "vae" / "config.json")
    (broken / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="could not load the qwenimage teacher from .*broken"):
        load_qwen_teacher(broken, 32)


def test_the_published_transformer_has_20_4b_parameters_and_the_lora_targets():
    import diffusers

    from dmdscale.families.qwenimage.memory import LORA_TARGETS, MODEL_CLASS, PARAMETERS, TRANSFORMER_CONFIG

    with torch.device("meta"):
        model = getattr(diffusers, MODEL_CLASS).from_config(TRANSFORMER_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS == 20_430_401_088
    assert model.inner_dim == 3072 and len(model.transformer_blocks) == 60
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for target in LORA_TARGETS:  # each names one linear in every block
        assert sum(n.endswith("." + target) for n in linears) == 60, target
