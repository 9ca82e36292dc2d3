"""The heterogeneous audio corpus (speech, music, environmental sound) of the reference LALM."""

from adapter.lalm.corpus.build import SIZES, TASKS, CorpusConfig, build_corpus

__all__ = ["SIZES", "TASKS", "CorpusConfig", "build_corpus"]
