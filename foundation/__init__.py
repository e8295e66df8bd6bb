"""What every stage shares: the user-facing error, atomic outputs, provenance, package data.

Nothing here imports a stage; every stage (``quantize``, ``abliterate``) and
``pipelines`` may import it.
"""
