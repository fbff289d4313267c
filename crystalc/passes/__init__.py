"""Graph -> Graph transformations, run in a declared order by passes.pipeline."""
