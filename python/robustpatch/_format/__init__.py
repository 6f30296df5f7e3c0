"""On-disk formats: the safetensors container (:mod:`.safetensors`, header codec in
the engine) and the undo record of a patched file (:mod:`.undo`)."""
