"""The streaming trainer: distils students from a cache without loading the teacher."""

from kdcache.train.config import StudentConfig, TrainConfig

__all__ = ["StudentConfig", "TrainConfig", "train"]


def __getattr__(name: str):
    # `train` pulls in torch; the configs alone (what the CLI checks a command line with) do not.
    if name == "train":
        from kdcache.train.loop import train

        return train
    raise AttributeError(f"module 'kdcache.train' has no attribute {name!r}")
