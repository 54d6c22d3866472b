"""The node: private data, DP-SGD training, and the node's own privacy state."""
