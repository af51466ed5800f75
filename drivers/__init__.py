"""The built-in drivers, one module per backend.

Each module defines one :class:`iomux.Multiplexer` subclass and nothing the
others need; :mod:`iomux.drivers.pollable` holds the base shared by the
backends whose kernel interface is a set of (fd, mask) registrations.
"""
