"""The training layer: the loop, its hooks (one per file), the schedule, the builders, train, the optimizers, the
probe, bench.
"""
