"""`sla2 demo`: not implemented yet (issue 7)."""

from ..errors import SLA2Error


def command():
    """Not implemented yet (issue 7)."""
    raise SLA2Error("sla2 demo is not implemented yet (issue 7)")
