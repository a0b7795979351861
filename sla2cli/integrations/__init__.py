"""Bridges into other training codebases; each needs its own optional extra (e.g. `sla2cli[lightning]`)."""
