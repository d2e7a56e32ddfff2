"""The search engine: the loop (ask → evaluate on Ray → record → tell), the strategies that
propose genomes, multi-fidelity, the executors, objectives and constraints, and fronts."""
