"""Which precision choices matter for the DM loss's gradient at high t (issue 14, part 1).

On the tiny random-weight sd15 UNet (64 px, 32x32 latents) at t (default 980, 1/sqrt(abar) ~ 13),
with a fake score made from the teacher by a relative weight perturbation (default 1%), the DM
gradient (x0_real - x0_fake) / mean|x - x0_real| of each precision set-up is compared with a
float64 reference (float64 networks and conversion). Results: bench/results/precision_dm_gradient.json.

    .venv/bin/python bench/precision_dm_gradient.py [T] [PERTURBATION]
"""
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dmdscale.families.sd.model import load_sd_teacher
from dmdscale.models.text_encoders import PromptEncoder
from dmdscale.families.sd.tiny import build_tiny_pipeline

torch.manual_seed(0)
folder = build_tiny_pipeline("sd15", Path(tempfile.mkdtemp()) / "tiny15", resolution=64)
teacher = load_sd_teacher(folder, "sd15", torch.float32)
cond = PromptEncoder.load(folder, "sd15").encode(["a cat", "a dog", "digit 3", "a red car"])
T = int(sys.argv[1]) if len(sys.argv) > 1 else 980
PERT = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-2
GS = 1.75
n = 4
x = torch.randn(n, 4, 32, 32)
t = torch.full((n,), T)
x_t = teacher.schedule.add_noise(x, torch.randn_like(x), t)
fake = copy.deepcopy(teacher)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in fake.parameters():
        p.add_(PERT * p.std().nan_to_num(0) * torch.randn(p.shape, generator=g))
sched = teacher.schedule
abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)

def x0_64(model, guidance):  # float64 network and conversion: the reference
    m = copy.deepcopy(model).double()
    m.schedule = sched
    c = {k: v.double() for k, v in cond.items()}
    un = m.null_cond(c)
    eps = m.predict(torch.cat([x_t, x_t]).double(), torch.cat([t, t]), {k: torch.cat([c[k], un[k]]) for k in c}) if guidance != 1 else m.predict(x_t.double(), t, c)
    if guidance != 1:
        ec, eu = eps.chunk(2)
        eps = eu + guidance * (ec - eu)
    return (x_t.double() - (1 - abar).sqrt() * eps) / abar.sqrt()

def run(model, guidance, weights, autocast):
    m = copy.deepcopy(model)
    if weights == torch.bfloat16:
        m.cast_network(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return m(x_t, t, cond, guidance).double()

def grad(x0r, x0f):
    pr, pf = x.double() - x0r, x.double() - x0f
    return (pr - pf) / pr.abs().mean(dim=(1, 2, 3), keepdim=True)

def rel(a, b):
    return float((a - b).norm() / b.norm())

t0 = time.time()
real64, fake64 = x0_64(teacher, GS), x0_64(fake, 1.0)
ref = grad(real64, fake64)
real_bf = run(teacher, GS, torch.bfloat16, True)
real_32 = run(teacher, GS, torch.float32, False)
fake_32 = run(fake, 1.0, torch.float32, False)
fake_bf = run(fake, 1.0, torch.bfloat16, True)
fake_ac = run(fake, 1.0, torch.float32, True)   # fp32 weights under autocast
print(f"t={T} abar={float(abar[0]):.5f} 1/sqrt(abar)={float(abar[0].rsqrt()):.2f} pert={PERT}")
print(f"|x0_real| mean {float(real64.abs().mean()):.4f}  |x0_fake-x0_real| mean {float((fake64-real64).abs().mean()):.5f}  |grad_ref| rms {float(ref.pow(2).mean().sqrt()):.5f}")
print(f"x0 error (mean abs vs fp64): teacher bf16 {float((real_bf-real64).abs().mean()):.5f}, teacher fp32 {float((real_32-real64).abs().mean()):.2e}, fake bf16 {float((fake_bf-fake64).abs().mean()):.5f}, fake fp32-under-autocast {float((fake_ac-fake64).abs().mean()):.5f}, fake fp32 {float((fake_32-fake64).abs().mean()):.2e}")
rows = {
 "all fp32, x0 float64": grad(real_32, fake_32),
 "authors: teacher bf16, fake fp32": grad(real_bf, fake_32),
 "teacher bf16, fake fp32 weights under autocast": grad(real_bf, fake_ac),
 "old: teacher bf16, fake bf16": grad(real_bf, fake_bf),
}
# x0 in float32 arithmetic instead of float64 (fp32 networks): the conversion's own error
def x0_f32(model, guidance):
    m = copy.deepcopy(model)
    with torch.no_grad():
        c = cond; un = m.null_cond(c)
        eps = m.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), {k: torch.cat([c[k], un[k]]) for k in c}) if guidance != 1 else m.predict(x_t, t, c)
        if guidance != 1:
            ec, eu = eps.chunk(2); eps = eu + guidance * (ec - eu)
        a = abar.float()
        return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).double()
rows["all fp32, x0 float32"] = grad(x0_f32(teacher, GS), x0_f32(fake, 1.0))
# bf16 x0 conversion on top of the old path
rows["old + x0 rounded to bf16"] = grad(real_bf.bfloat16().double(), fake_bf.bfloat16().double())
errors = {k: rel(v, ref) for k, v in rows.items()}
for k, v in errors.items():
    print(f"rel err of DM grad vs fp64 reference: {k:50s} {v:.3e}")
# isolating the fake-score pass: reference with the same bf16 teacher output
ref_shared = grad(real_bf, fake64)
fake_pass = {k: rel(grad(real_bf, f), ref_shared)
             for k, f in (("fake fp32", fake_32), ("fake fp32 under autocast", fake_ac), ("fake bf16", fake_bf))}
for k, v in fake_pass.items():
    print(f"rel err vs (bf16 teacher, fp64 fake) reference: {k:30s} {v:.3e}")
x0_errors = {"teacher bf16": float((real_bf - real64).abs().mean()), "teacher fp32": float((real_32 - real64).abs().mean()),
             "fake bf16": float((fake_bf - fake64).abs().mean()), "fake fp32 under autocast": float((fake_ac - fake64).abs().mean()),
             "fake fp32": float((fake_32 - fake64).abs().mean())}
out = Path(__file__).parent / "results" / "precision_dm_gradient.json"
out.write_text(json.dumps({"t": T, "one_over_sqrt_abar": float(abar[0].rsqrt()), "weight_perturbation": PERT,
                           "guidance_scale": GS, "device": "cpu", "torch": torch.__version__,
                           "dm_gradient_relative_error_vs_float64": errors,
                           "fake_pass_relative_error_with_the_same_bf16_teacher": fake_pass,
                           "x0_mean_abs_error_vs_float64": x0_errors}, indent=1))
print(f"{time.time()-t0:.1f}s -> {out}")
