"""Teacher families: one folder each (`<name>/`: the family, its network adapter, its export,
a README), one line each in `FAMILIES`.

A family (the contract `dmdscale.contracts.Family`, implemented on `base.FamilyBase`) answers
everything that differs between teachers: its config checks, preflight, teacher loading, critic
head, data stream, evaluation and student export. The command line, the driver and the sweep
look the family up once, `resolve(cfg)`, and hand it down; nothing below them compares
`model.family` to a name.
Adding a family: write its folder, add its line below (CONTRIBUTING.md, "Adding a family").
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dmdscale.config import ConfigError
from dmdscale.contracts import Evaluation, Family, RunInputs, Trained
from dmdscale.families.flow import FlowFamily
from dmdscale.families.qwenimage import QwenImageFamily
from dmdscale.families.sd import SDFamily
from dmdscale.families.toy2d import Toy2dFamily
from dmdscale.families.unet2d import UNet2DFamily

if TYPE_CHECKING:
    from dmdscale.config import Config

FAMILIES: dict[str, Family] = {family.name: family for family in (
    Toy2dFamily(),
    UNet2DFamily(),
    SDFamily("sd15"),
    SDFamily("sdxl"),
    FlowFamily("sd3"),
    FlowFamily("flux"),
    QwenImageFamily(),
)}


def resolve(cfg: Config) -> Family:
    """The family `model.family` names, once the keys that depend on it are checked (the
    family's own `check_config` and what it supports); a ConfigError naming the key otherwise."""
    family = FAMILIES.get(cfg.model.family)
    if family is None:
        raise ConfigError(f"config key 'model.family': unknown family {cfg.model.family!r}; "
                          f"choose from {', '.join(FAMILIES)}")
    try:
        family.check_config(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    def supporting(flag: str) -> str:
        return ", ".join(name for name, f in FAMILIES.items() if getattr(f, flag))

    if cfg.loss.regression_weight > 0 and not family.supports_regression_loss:
        raise ConfigError(f"loss.regression_weight: the regression term in DMD2 is for the "
                          f"{supporting('supports_regression_loss')} families, not {family.name!r}; SD1.5/SDXL "
                          f"teachers pretrain on ODE pairs in a regression stage instead (regression.enabled)")
    if cfg.regression.enabled and not family.supports_regression_stage:
        raise ConfigError(f"regression.enabled: the regression stage (teacher ODE pairs from prompts) is for the "
                          f"{supporting('supports_regression_stage')} families, not {family.name!r}; leave "
                          f"regression.enabled false" + (" (loss.regression_weight adds DMD1's regression term to "
                                                         "DMD2 instead)" if family.supports_regression_loss else ""))
    if cfg.export.choose == "held_out" and not family.chooses_export:
        raise ConfigError(f"export.choose: held_out picks the exported weights by FID on held-out images, which the "
                          f"{supporting('chooses_export')} families compute; {family.name!r} takes 'fixed'")
    if cfg.export.choose == "held_out" and not cfg.train.ema_decays:
        raise ConfigError("export.choose: held_out compares the raw weights with the averages of train.ema_decays, "
                          "which is empty; give a decay (e.g. [0.97]) or use 'fixed'")
    if cfg.lora.enabled and not family.supports_lora:
        raise ConfigError(f"lora.enabled: LoRA applies to the {supporting('supports_lora')} families, "
                          f"not {family.name!r}")
    return family


__all__ = ["FAMILIES", "Evaluation", "Family", "RunInputs", "Trained", "resolve"]
