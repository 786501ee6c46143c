"""grayproxy: a grayscale-release reverse proxy."""

__version__ = "0.1.0"
