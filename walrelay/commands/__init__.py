"""The ``celery`` sub-commands walrelay adds: ``celery -A <app> pump`` and
``celery -A <app> deadletters``, registered as ``celery.commands`` entry points (as
Flower registers ``celery flower``), and the hook an app uses for commands of its own
(``walrelay.commands.app``)."""
