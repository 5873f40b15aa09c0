"""Quality evaluation of text encoders on real data: the Lee similarity benchmark (`evaluate_lee`) and the
quality suite (`evaluate_suite`: similarity, classification, clustering and retrieval tasks with baselines)."""

from .metrics import kmeans_v_measure, linear_probe, pearson, retrieval_scores, spearman
from .suite import evaluate_suite, format_table, write_result
from .tasks import TASKS, Task, evaluate_lee, load_tasks

__all__ = ["TASKS", "Task", "evaluate_lee", "evaluate_suite", "format_table", "kmeans_v_measure", "linear_probe",
           "load_tasks", "pearson", "retrieval_scores", "spearman", "write_result"]
