"""Airflow 3 plugin: the priority weight strategy that starts the slowest model's training first.

`train` is a mapped task over the models in slowest-first order (gender_tasks.scheduling), and
Airflow's built-in weight rules give every map index the same weight. This strategy lowers the
weight by map index: index 0 (the slowest model) gets the task's `priority_weight`, each later
index STEP less. The DAG names it by its import path, `gender_scheduling.SlowestModelFirst`; Airflow
only accepts a strategy that a plugin registers, so this file must be in the plugins folder of every
component that parses or schedules the DAG (the DAG processor, the scheduler, the API server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.plugins_manager import AirflowPlugin
from airflow.task.priority_strategy import PriorityWeightStrategy

if TYPE_CHECKING:
    from airflow.models import TaskInstance


class SlowestModelFirst(PriorityWeightStrategy):
    """Weight = the task's priority_weight - STEP x map index (never below 1); unmapped: priority_weight."""

    STEP = 10  # room for another task (the label audit) to sit between two models

    def get_weight(self, ti: TaskInstance) -> int:
        base = int(ti.task.priority_weight) if ti.task is not None else 1
        index = ti.map_index if ti.map_index is not None and ti.map_index >= 0 else 0
        return max(base - self.STEP * index, 1)


class GenderSchedulingPlugin(AirflowPlugin):
    name = "gender_scheduling"
    priority_weight_strategies = [SlowestModelFirst]
