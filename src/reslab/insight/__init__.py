"""The insight layer: audit, comparisons, the mistakes gallery, figures, the HTML report, the lr range test."""
