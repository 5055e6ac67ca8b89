"""Everything on disk: the safetensors reader and streaming writer, sharded indexes, the
native qtool artifact, and the table of formats (sinks and sources) in registry.py."""
