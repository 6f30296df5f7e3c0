"""File I/O under the formats: atomic files (:mod:`.atomic`), direct I/O
(:mod:`.direct`) and byte-range reads, writes and copies (:mod:`.ranged`)."""
