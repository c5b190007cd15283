"""Training/inference helpers on top of MONAI's Ignite engines."""

from .checkpoints import ResumeFromLatest, latest_checkpoint, load_checkpoint, load_state
