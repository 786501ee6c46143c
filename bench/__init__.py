"""The grayproxy benchmark harness: `python -m bench --help`."""
