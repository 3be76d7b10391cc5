# SPDX-License-Identifier: GPL-2.0-or-later
"""Packaging shim: all metadata lives in setup.cfg."""

from setuptools import setup

setup()
