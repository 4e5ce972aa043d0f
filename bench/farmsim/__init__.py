"""Workloads for the farm simulator (:mod:`shared.scheduling.sim`) that ``bench/scheduler.py`` measures."""
