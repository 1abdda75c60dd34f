"""``coordinator probe``: measure, from where it runs, the latencies an HA deployment depends on.

Every replica must be within the threshold (10 ms by default) of every other and of Postgres.
Given the database URL (or one replica's URL and an API token), the probe discovers the live
replicas and measures, each as the median of a few samples:

* the database round trip (``SELECT 1``) and the pub/sub round trip (NOTIFY to LISTEN) from here;
* per replica: ``GET <relay>/derp/latency-check`` on a kept-alive connection, and a DERP Ping
  through its relay;
* per ordered pair of replicas A, B in one region (the mesh path): a probe client on A's relay
  sends to a probe client on B's relay, which echoes. The round trip crosses A's and B's relays
  twice; what is judged is the relays' share of it, the round trip minus the probe's own DERP
  pings to A and to B (the legs between this host and the two relays);
* per custom relay node of the DERP map (``--derp-map``, see ``docs/custom-relays.md``): ``GET
  /derp/probe`` and a DERP ping, judged on answering only;
* and it shows what the replicas measured themselves: their database and pub/sub latency and
  the peer matrix (``replicas.peer_latencies``).

Exit status: 0 when every figure is within the threshold and every replica answers, 1 when not,
2 for usage and configuration errors (bad arguments, a URL that leads nowhere, a refused token, a
server that is not a coordinator), with a one-line message on stderr. ``--json`` prints the
``coordinator.ops.probe/v1`` document described in ``docs/latency.md``. With neither ``--pg-url`` nor
``--url`` (nor the environment), it probes the embedded PostgreSQL of the local data directory, the
one ``make run`` starts.

Modules: ``model`` (figures, replicas, formats), ``discovery`` (database or API), ``measure``,
``report`` (the pure judgement), ``render`` (text), ``run`` (one run), ``cli``.
"""

from coordinator.ops.probe.cli import add_arguments, build_parser, main, run_from_args
from coordinator.ops.probe.model import (
    DEFAULT_SAMPLES,
    DEFAULT_TIMEOUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    SCHEMA,
    ProbeUsageError,
)
from coordinator.ops.probe.render import render_text
from coordinator.ops.probe.report import build_report
from coordinator.ops.probe.run import run_probe

__all__ = [
    "DEFAULT_SAMPLES",
    "DEFAULT_TIMEOUT",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "SCHEMA",
    "ProbeUsageError",
    "add_arguments",
    "build_parser",
    "build_report",
    "main",
    "render_text",
    "run_from_args",
    "run_probe",
]
