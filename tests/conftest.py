"""Shared fixtures. 8 fake CPU devices so sharding is tested on every run; tiny shapes, compiled once."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
