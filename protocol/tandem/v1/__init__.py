"""Generated messages and stubs of the ``tandem.v1`` protobuf package.

Regenerate with ``python -m protocol.generate``.
"""
