"""The descriptor pool that holds this server's protocol messages.

A private pool, not protobuf's default one, so that the server's `inference.*`
messages never clash with another copy of the same protocol (tritonclient's,
KServe's) loaded into the same process.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
