"""Declares the Cython data plane; everything else lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILE_ARGS = ["-O3"]

extensions = [
    Extension(f"_relay.{name}", [f"_relay/{name}.pyx"], extra_compile_args=COMPILE_ARGS)
    for name in ("codec", "relay")
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
