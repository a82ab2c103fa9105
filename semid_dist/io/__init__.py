"""Catalog sharding, schemas, batch validation, duplicate ids, fsspec helpers and the
versioned table store."""
