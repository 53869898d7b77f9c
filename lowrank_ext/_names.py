"""Short listings of layer names for error messages."""


def preview(names, limit=6):
    """The first ``limit`` names, and how many there are in all when more."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"
