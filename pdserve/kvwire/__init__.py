"""The KV stream codec: encodings, checksums and validation against the receiving model."""
