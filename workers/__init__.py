"""Celery workers for nos (installed as nos.workers)."""
