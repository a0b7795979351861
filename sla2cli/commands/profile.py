"""`sla2 profile`: not implemented yet (issue 5)."""

from ..errors import SLA2Error


def command():
    """Not implemented yet (issue 5)."""
    raise SLA2Error("sla2 profile is not implemented yet (issue 5)")
