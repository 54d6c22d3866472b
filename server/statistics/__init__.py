"""Federated statistics jobs: one DP query to every node, summed up as stats.json and stats.html."""
