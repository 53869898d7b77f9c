"""A stand-in for tqdm's bar that records what compress_model does with it."""


class RecordingBar:
    """Takes tqdm's arguments; keeps the total, the count and whether it was closed.

    Every bar made is appended to ``RecordingBar.made`` (reset it per test).
    """

    made = []

    def __init__(self, total=None, **kwargs):
        self.total, self.n, self.closed = total, 0, False
        RecordingBar.made.append(self)

    def update(self, n=1):
        assert not self.closed, "update after close"
        self.n += n

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        self.closed = True
