"""Data sets used by evaluation and training (read-only access, no bundled copies)."""

from .lee import LeeBenchmark, lee_background_documents, load_lee

__all__ = ["LeeBenchmark", "lee_background_documents", "load_lee"]
