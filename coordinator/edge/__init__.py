"""The HTTP edge: uvicorn's protocol with the DERP upgrade, the listener's budgets, the relay's routes.

``uvicorn coordinator.app:app --http coordinator.edge:DerpHttpProtocol`` serves a replica.
"""

from coordinator.edge.protocol import DerpHttpProtocol

__all__ = ["DerpHttpProtocol"]
