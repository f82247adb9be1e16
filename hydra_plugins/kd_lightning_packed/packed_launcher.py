"""hydra/launcher=packed: the jobs of a sweep that may train together do, in this process; the others run
one after another as Hydra's basic launcher runs them, each with one line saying why it runs alone.

Hydra loads launchers from the `hydra_plugins` package only, hence this module's place; conf/hydra/launcher/
packed.yaml names it; the work is kd_lightning.runners.packed's.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def _read(cfg: DictConfig) -> object:
    """A job's config read as kd-train reads it (its folder and every key), nothing run yet."""
    from kd_lightning.config.request import read_request

    return read_request(cfg)


class PackedLauncher(Launcher):
    def __init__(self) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _job(self, overrides: Sequence[str], idx: int, task: TaskFunction) -> JobReturn:
        """One job as Hydra's basic launcher prepares it (its folder, .hydra/, log), running `task`."""
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        return run_job(
            hydra_context=self.hydra_context,
            task_function=task,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from kd_lightning.config.request import RunRequest
        from kd_lightning.runners.packed import plan_packs, run_pack

        assert self.config is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        read = [self._job(o, initial_job_idx + i, _read) for i, o in enumerate(job_overrides)]
        ready = [(j, r.return_value) for j, r in enumerate(read) if r.status == JobStatus.COMPLETED]
        jobs_of = [j for j, q in ready if isinstance(q, RunRequest)]
        requests = [q for _, q in ready if isinstance(q, RunRequest)]
        plan = plan_packs(requests)
        returns: dict[int, JobReturn] = {}
        for pack in plan.packs:
            jobs = [jobs_of[i] for i in pack]
            log.info("packed: jobs %s train together", ", ".join(f"#{initial_job_idx + j}" for j in jobs))
            try:
                results = run_pack([requests[i] for i in pack])
                for j, r in zip(jobs, results, strict=True):
                    read[j].return_value = r.get("val_acc")
                    returns[j] = read[j]
            except Exception as e:  # every job of the pack failed with it (each results.json says so)
                for j in jobs:
                    read[j].status, read[j].return_value = JobStatus.FAILED, e
                    returns[j] = read[j]
        alone = {jobs_of[i]: why for i, why in plan.alone.items()}
        for j, overrides in enumerate(job_overrides):
            if j in returns:
                continue
            why = alone.get(j, "its config could not be read")
            log.info(
                "packed: job #%d (%s) runs alone: %s",
                initial_job_idx + j,
                " ".join(filter_overrides(overrides)),
                why,
            )
            returns[j] = self._job(overrides, initial_job_idx + j, self.task_function)
        return [returns[j] for j in range(len(job_overrides))]
