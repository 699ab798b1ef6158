"""Property-based fuzzing (issue 15, item 8): bounded example counts so the set runs in
well under a minute in ``make test``."""
