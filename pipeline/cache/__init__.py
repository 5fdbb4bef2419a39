"""Teacher-output cache: schema, key, writer (Ray Data), reader, store commands."""
