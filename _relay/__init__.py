"""The DERP relay's data plane, compiled with Cython. There is no pure-Python fallback."""

try:
    from _relay import codec, relay  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "the compiled DERP relay (_relay.codec, _relay.relay) is missing: build it with "
        "`pip install .` (or `python setup.py build_ext --inplace` in a source checkout); "
        f"this needs Cython and a C compiler. Original error: {exc}"
    ) from exc
