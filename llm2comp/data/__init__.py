"""Data sets used by evaluation and training (read-only access, no bundled copies)."""

from .labeled import LabeledTexts, load_fortunes, load_gcide
from .lee import LeeBenchmark, lee_background_documents, load_lee
from .manpages import ManPageRetrieval, load_manpages

__all__ = ["LabeledTexts", "LeeBenchmark", "ManPageRetrieval", "lee_background_documents", "load_fortunes",
           "load_gcide", "load_lee", "load_manpages", "text_lines"]


def text_lines(text: str) -> list[str]:
    """The lines of `text`, ended by a newline only (not also by str.splitlines' U+2028, \\x1c and the like,
    which can sit inside a document), carriage returns stripped; a final newline opens no empty line, and an
    empty text has none."""
    return [line.rstrip("\r") for line in text.removesuffix("\n").split("\n")] if text else []
