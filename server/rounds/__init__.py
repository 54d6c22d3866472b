"""The round engine: who takes part, what is sent, what comes back and how it is combined.

Roster and cohort, the exchange with nodes, the strategies (Flower's, with
consortia's screening), update checks, aggregation in the clear or under
SecAgg+, and the per-round record of what happened. Imports `common` and
nothing else of the server: outputs, reports and the coordinator service build
on it, never the other way round.
"""
