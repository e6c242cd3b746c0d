"""The config layer: TrainConfig (its fields in sections, each with its range) and the presets with their budget rules.
"""
