"""Builds the optional native modules; everything else is in pyproject.toml.

* ``ispf.hazmat._native``: the curve's hot loops (hash-to-curve, X25519);
* ``ispf._records``: the record operations (sort, zip, merge, select, shuffle).

Both are optional: without a C compiler the install still succeeds and the
pure-Python code is used (ispf.hazmat.curve, ispf_server.records; same results,
slower).
"""

from setuptools import Extension, setup

FLAGS = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension(
            "ispf.hazmat._native",
            sources=["common/ispf/hazmat/_native.c"],
            depends=["common/ispf/_blake3.h", "common/ispf/hazmat/_ifma_portable.h"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "ispf._records",
            sources=["common/ispf/_records.c"],
            depends=["common/ispf/_blake3.h"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
    ]
)
