"""Checkpoints, one job per module; import each name from its module (nothing is re-exported):

- `state`: what a worker saves and restores: `Checkpointable`, `DataPosition`, `TrainingState`,
  `rng_states` / `set_rng_states`, `save_training_state` / `load_training_state`,
  `save_run_config`, `EMACheckpoint`, the per-rank state and RNG file names and `CONFIG_FILE`.
- `integrity`: checksums and damage: `write_checksums`, `verify_checkpoint`,
  `CorruptCheckpoint`, `CheckpointMismatch`, `checkpoint_folders`, `checkpoints_before`,
  `load_latest_good`, the checkpoint format mark (`CHECKPOINT_FORMAT`) and Ray's folder
  prefix (`CHECKPOINT_PREFIX`).
- `stages`: what a next run starts from (train.init): `STAGE_DIR`, `STAGE_PARTS`, `save_stage`,
  `load_stage`, `init_source`, `check_init`, `check_init_fits`.
- `faults`: fault injection: `InjectedFailure`, `parse_fail_at_step` (DMDSCALE_FAIL_AT_STEP).
- `journal`: the driver's run journal: `RunJournal`, `RESUMABLE_CHANGES`, `EVALUATION_CHANGES`.

Imports among them go one way: `journal` -> `state` -> `integrity`; `stages` and `faults`
stand alone.
"""
