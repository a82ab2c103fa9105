"""Schemas, batch validation, fsspec helpers and the versioned table store."""
