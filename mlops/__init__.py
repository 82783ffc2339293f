"""Shared building blocks of the MLOps stack: settings, local services, data, training, model store."""
