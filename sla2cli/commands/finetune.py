"""`sla2 finetune`: not implemented yet (issue 4)."""

from ..errors import SLA2Error


def command():
    """Not implemented yet (issue 4)."""
    raise SLA2Error("sla2 finetune is not implemented yet (issue 4)")
