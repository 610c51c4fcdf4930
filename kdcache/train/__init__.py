"""The streaming trainer: distils students from a cache without loading the teacher."""

from kdcache.train.config import StudentConfig, TrainConfig
from kdcache.train.loop import train

__all__ = ["StudentConfig", "TrainConfig", "train"]
