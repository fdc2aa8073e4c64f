"""ltscale: multi-stage long-tailed recognition (SSD, DiVE and their baselines) at scale."""

__version__ = "0.1.0"
