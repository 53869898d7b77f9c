"""Short listings of layer names, and errors in one line, for messages."""


def preview(names, limit=6):
    """The first ``limit`` names, and how many there are in all when more."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"


def first_line(exc):
    """The first line of an error's message (KeyError's without the quotes
    str() adds), or the error's type where it has none."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = str(text).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def owner_prefix(owner):
    """``"owner: "`` to start a message with the function that failed; the
    command line passes None (its error line names the command)."""
    return f"{owner}: " if owner else ""
