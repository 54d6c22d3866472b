"""Secure aggregation (SecAgg+): the pieces both sides of the protocol share.

- `shamir`: t-of-k secret sharing over the prime field GF(2^521 − 1);
- `crypto`: X25519 key pairs, HKDF-derived keys, AES-GCM sealed shares;
- `masks`: ChaCha20 keystreams added to vectors in chunks (no full-size temporary);
- `fixed_point`: the integer encoding whose sum cannot overflow or silently clip;
- `graph`: the random k-regular communication graph of a round;
- `wire`: the stage payloads, validated where they are received.

The coordinator's side is `consortia.server.rounds.secure_aggregation`, the node's
`consortia.client.secure_aggregation`; docs/secure-aggregation.md has the
protocol and its threat model.
"""
