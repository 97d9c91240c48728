"""The artifact directory as a contract: manifest.json (schema, checksums, atomic writes), the staging
directory a build writes into and renames, and `inspect`'s table of a manifest.

Imports only `llamaexport.model` (the config and chat formats a manifest is validated against).
"""
