"""dmdscale: DMD2 distillation of diffusion models into few-step students, with Ray + DeepSpeed.

`import dmdscale` stays cheap (no torch or diffusers): the driver is `dmdscale.driver.run`, the
command line `python -m dmdscale`. Exported students need no dmdscale at all: they load with
stock diffusers (see `dmdscale.export`).
"""
