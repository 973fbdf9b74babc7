"""Backend-neutral numerical kernels (formulas written against an array namespace ``xp``)."""
