"""The ``gateway`` command's subcommands that are more than wiring: ``gateway check``'s probes
(:mod:`.check`), ``gateway synapse-config`` (:mod:`.synapse_config`) and ``gateway
proxy-config`` (:mod:`.proxy_config`). They sit above everything they report on: the app,
the features, the services.
"""
