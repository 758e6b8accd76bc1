"""The scaling layer around `dmdscale.core`: DeepSpeed ZeRO engines (engine), the Ray Train
worker (worker) and its launch from the driver (launch), checkpoints, resume and the run
journal (checkpoint), the backward-simulation rollout pool (rollouts), the checkpoint
evaluation pool (evalpool), and the one resource planner (resources)."""
