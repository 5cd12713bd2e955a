"""The model registry: choosing the best run and moving the `champion` alias to it.

`promotion` holds the rule (same data, better metric) and its store lock; `promote` is the
`landcover-promote` command.
"""
