"""Thin endpoint modules: parse, call a service, shape the answer."""
