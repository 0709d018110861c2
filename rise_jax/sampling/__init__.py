"""Generation: the continuous-batching engine over a paged KV pool, the project's one generator.

`requests` (what is asked and returned; no JAX), `engine` (the host scheduler), `paged` (its device programs),
`blocks` (the block table and prefix cache), `select` (token selection and random keys).
"""
