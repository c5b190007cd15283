"""Training/inference helpers on top of MONAI's Ignite engines."""

from .checkpoints import ResumeFromLatest, TrainerProgress, latest_checkpoint, load_checkpoint, load_state
