"""The one exception type for problems a user can fix (bad config, wrong checkpoint, broken env)."""


class MadistillError(Exception):
    """A user-fixable problem. The CLI prints its message on one line and exits with status 2.

    Messages say what is wrong *and* how to fix it, e.g.
    ``"unknown env 'foo': use env=<id> with one of [...] or env.target=<module.factory>"``.
    """
