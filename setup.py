"""Builds the optional native module (ispf.hazmat._native); everything else is in pyproject.toml.

The module is optional: without a C compiler the install still succeeds and
ispf.hazmat.curve uses its pure-Python code (same results, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ispf.hazmat._native",
            sources=["common/ispf/hazmat/_native.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
