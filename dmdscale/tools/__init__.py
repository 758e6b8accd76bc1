"""Tools beside the training path: the memory planner's method (`memory`; each family's
numbers are a `MemoryProfile` in its folder, the command is `python -m dmdscale.memory`) and the
configuration reference (`python -m dmdscale.tools.config_reference`, docs/configuration.md).
Each family's tiny offline pipeline builder and teacher trainer are in its folder."""
