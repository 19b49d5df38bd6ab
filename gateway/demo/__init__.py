"""The demo and the Synapse it runs, apart from the serving code: ``gateway demo``
(:mod:`.stack`, also the integration tests' stack), ``gateway demo-peer`` (:mod:`.peer`) and
the Synapse configuration and process they share (:mod:`.synapse`). Nothing that serves
traffic imports this package.
"""
