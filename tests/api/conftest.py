"""In-process API tests reuse the mesh tests' nodes on loopback aliases (127.0.20.x)."""

from tests.mesh.conftest import hosts, make_node

__all__ = ["hosts", "make_node"]
