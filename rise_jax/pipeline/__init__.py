"""Config -> objects -> stages over a run directory (docs/architecture.md): `resources` (the one place a config
becomes a tokenizer, meshes, models, policies and problem slices), `plan` (the stages and the stop hook),
`stages` and `evaluation` (their bodies; one evaluation stage serves `rise_jax.run` and `rise_jax.evaluate`),
`rundir` (DONE markers, config refusal), `loop` (run them), `summary`, and the config builders `recipes` and
`capacity`. Importing the package imports nothing else.
"""
