"""The coordinator: Flower ServerApp, strategies, aggregation, run outputs."""
