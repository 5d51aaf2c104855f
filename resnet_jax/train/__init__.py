"""Training: config fields (fields.py, each declared once) and their checks, the run's plan,
optimizer and schedule, state, pure steps, on-device feeding, data sources, the loop
(train_and_evaluate), checkpoints, workdir and metrics, EMA of the weights and BN
recalibration."""
