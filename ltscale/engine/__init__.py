"""The one training loop, evaluation, schedules and checkpointing."""
