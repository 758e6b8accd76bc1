"""Teacher families: one module each, one line each in `FAMILIES`.

A family (`base.Family`) answers everything that differs between teachers: its config checks,
preflight, teacher loading, critic head, data stream, evaluation and student export. Nothing
else in dmdscale compares `model.family` to a name; it asks `family_of(cfg)`.
Adding a family: write its module, add its line below.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dmdscale.families.base import Evaluation, Family, RunInputs, Trained
from dmdscale.families.flow import FlowFamily
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
)}


def family_of(cfg: Config) -> Family:
    """The family a config names (`model.family`, validated against FAMILIES)."""
    return FAMILIES[cfg.model.family]


__all__ = ["FAMILIES", "Evaluation", "Family", "RunInputs", "Trained", "family_of"]
