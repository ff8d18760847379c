"""The small-scale replication's own pieces, apart from the product: the procedural shapes set (shapes.py),
its structure measure (structure.py), and the position probe (probe.py)."""
