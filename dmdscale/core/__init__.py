"""The DMD2 math in plain PyTorch, one process, no Ray, DeepSpeed or MLflow import.

schedule (DDPM/VP noise schedules), losses (each loss a short callable), sampling (the
student's few-step sampler, the teacher's many-step one, backward simulation), seeds (every
named random stream), step (one DMD2 iteration with TTUR), optim (a module with its
optimiser), loop (the plain training loop). The distributed layer wraps these; it never
changes them.
"""
