"""Magic 1-For-1: efficient image-to-video generation (first frame + 4-step int8 I2V + sliding window)."""

__version__ = "0.1.0"
