"""What a run leaves behind: its folder, manifest, model files, checkpoints, metrics and report.

Also reading it back: resuming from a checkpoint and the model registry.
Imports the round engine (`server.rounds`) for the records it writes; the
round engine never imports this package.
"""
