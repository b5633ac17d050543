"""Shared state of several rack servers (issue #19, docs/scale.md).

``state.backend: yaml`` (the default): nothing here is used and no database is needed.
``state.backend: postgresql``: hosts, profiles and images come from PostgreSQL
(:mod:`sidusd.state.pg`, psycopg imported only then), held as an in-memory
:class:`~sidusd.state.snapshot.StateSnapshot` and a local copy on disk
(:mod:`sidusd.state.localcopy`); boot events go back in batches through a bounded
queue (:mod:`sidusd.state.queue`).  The edge that runs it all: :mod:`sidusd.state.service`.
Pure: ``snapshot`` and ``queue``.
"""
