"""Training: config validation, optimizer and schedule, state, pure steps, on-device feeding,
the loop (train_and_evaluate), checkpoints, workdir and metrics."""
