"""Shim for editable installs with pip versions older than 21.3; metadata lives in setup.cfg."""

from setuptools import setup

setup()
