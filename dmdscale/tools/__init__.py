"""Tools beside the training path: the memory planner (`python -m dmdscale.tools.memory`) and
the configuration reference (`python -m dmdscale.tools.config_reference`, docs/configuration.md).
Each family's tiny offline pipeline builder and teacher trainer are in its folder."""
