"""Training: the loop (trainer.py), engine and optimizer builders (engine.py), the LR schedule,
evaluation, and the run's inputs resolved once per start (inputs.py)."""
