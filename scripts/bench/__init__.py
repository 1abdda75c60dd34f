"""The relay benchmarks' parts, shared by ``bench_relay.py``, ``bench_mesh.py`` and ``bench_idle.py``.

``proc``: server child processes and /proc readings; ``clients``: the DERP client protocols and one
client process's case; ``driver``: running a case across client processes and summing their figures;
``relay_server``: the relay under test (``python -m bench relay``); ``baseline``: the pure-Python
relay it is compared with (``python -m bench baseline``); ``floor``: the zero-work C relay;
``report``: tables, ratios and targets; ``options``: the command-line options the scripts share.
"""
