"""The built-in tasks: importing this module registers each in :data:`petra.registry.TASKS`
(which imports it on its first lookup)."""

from petra.tasks import digits, events, mnist1d, mobilenet, text, vit  # noqa: F401
