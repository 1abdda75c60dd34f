"""Declares the Cython data plane and puts the nginx example into the wheel; the rest is in pyproject.toml."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

COMPILE_ARGS = ["-O3"]
# deploy/nginx/coordinator.conf is what operators copy; the wheel carries it for `coordinator demo`.
NGINX_EXAMPLE = Path("deploy/nginx/coordinator.conf")

extensions = [
    Extension(f"_relay.{name}", [f"_relay/{name}.pyx"], extra_compile_args=COMPILE_ARGS)
    for name in ("codec", "relay")
]


class BuildPy(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "coordinator" / "deploy" / "nginx" / NGINX_EXAMPLE.name
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(NGINX_EXAMPLE), str(target))


setup(
    cmdclass={"build_py": BuildPy},
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
