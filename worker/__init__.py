"""The rlora worker: a Celery app whose one task runs a training job from the database."""
