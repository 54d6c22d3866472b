"""Example consortia model plugins: `gn_resnet` (images) and `tabular_embeddings` (tables).

Each module defines a model, its settings (a pydantic model: the job's
`[model]` keys beside `name`) and the `ModelPlugin` that pyproject.toml
registers under the entry-point group `consortia.models`.
"""
