"""`sla2 eval-fid`: not implemented yet (issue 6)."""

from ..errors import SLA2Error


def command():
    """Not implemented yet (issue 6)."""
    raise SLA2Error("sla2 eval-fid is not implemented yet (issue 6)")
