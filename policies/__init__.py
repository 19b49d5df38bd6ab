"""Built-in and example admission policies, written only against ``gateway.policy.api``.

Configure them in ``gateway.toml`` as ``[[policies]]`` entries; see ``README.md`` here for
writing your own.
"""
