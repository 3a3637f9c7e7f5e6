"""The one training loop, its tasks, evaluators and checkpoints."""
