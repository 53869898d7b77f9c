"""matplotlib for the commands that draw (``bench --plot``, ``spectrum --plot``),
checked before any work so that a long run never ends in a missing library or
an image format matplotlib cannot write."""

import io
import os


def load_matplotlib():
    """``matplotlib.pyplot`` on the file-only Agg backend; a RuntimeError without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib; install it with `pip install "
                           "lowrank_ext[plot]` (or `pip install matplotlib`)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_format(path):
    """The image format for ``path``, from its extension (png without one); checked."""
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1][1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if ext not in supported:
        raise ValueError(f"--plot {path}: matplotlib cannot write {ext!r} images; use one of "
                         f"{', '.join(sorted(supported))}")
    # Some formats need a program outside matplotlib (pgf: a TeX system) and
    # fail only when drawn: a tiny figure with text, drawn now, finds out.
    plt = load_matplotlib()
    figure = plt.figure(figsize=(1, 1))
    try:
        figure.text(0.5, 0.5, "1.0×")
        figure.savefig(io.BytesIO(), format=ext)
    except Exception as exc:  # whatever the format's writer raises
        raise ValueError(f"--plot {path}: matplotlib cannot write {ext!r} images here: "
                         f"{exc}") from None
    finally:
        plt.close(figure)
    return ext
