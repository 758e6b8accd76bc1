"""Tools beside the training path: the memory planner (`python -m dmdscale.tools.memory`),
tiny random-weight SD pipelines for tests (`python -m dmdscale.tools.tiny_sd`), and the small
class-conditional teacher dmdscale trains for the digits demo (teacher)."""
